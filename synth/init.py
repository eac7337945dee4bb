"""Where synthetic images start: `noise`, `real`, `real_confident` or `confident_crops` (see
`synth.config.InitConfig`).

Selections are drawn per class from generators keyed by (seed, class), then sliced by the chunk's
IPC range, so every chunking and every rank picks the same images for the same slots.
`confident_crops` is RDED's selection (LINs-lab/RDED `synthesize/utils.py`: `MultiRandomCrop`,
`pad`, `cross_entropy`, `selector`, `mix_images`; `synthesize/main.py` `init_images`).
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.augment import apply_crops, sample_crops
from distill.config import ConfigError
from distill.data import ImageSet
from synth.config import InitConfig


def keyed_generator(*key: object) -> torch.Generator:
    """A CPU generator seeded by what the work is (never by who runs it, or when)."""
    digest = hashlib.sha256(":".join(map(str, ("distill.synth", *key))).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def gather(real: ImageSet, idx: Tensor) -> Tensor:
    """uint8 images `real[idx]`: indexed in memory, or decoded one by one from a lazy ImageFolder."""
    if hasattr(real, "images"):
        return real.images[idx]
    return torch.stack([real[int(i)][0] for i in idx]) if len(idx) else torch.empty(0, dtype=torch.uint8)


def class_indices(real: ImageSet) -> dict[int, Tensor]:
    return {c: torch.nonzero(real.targets == c).flatten() for c in range(real.num_classes)}


def check_init(init: InitConfig, ipc: int, real: ImageSet, by_class: dict[int, Tensor]) -> None:
    """Before compute: real-image inits need ipc distinct real images in every class (ipc·stitch²
    for stitched crops: one patch per image), as many candidates, and stitched cells of ≥ 1 pixel."""
    if init.kind == "noise":
        return
    need = ipc * init.reals_per_image
    what = f"ipc·stitch² = {ipc}·{init.stitch}² = {need}" if init.reals_per_image > 1 else f"ipc: {ipc}"
    if init.candidates is not None and init.candidates < need:
        raise ConfigError(f"init.candidates: {init.candidates} < {what}: init.kind {init.kind!r} takes each "
                          f"synthetic image's pixels from distinct real images; raise candidates or lower ipc")
    if init.stitch > real.image_size:
        raise ConfigError(f"init.stitch: {init.stitch} cells per side of {real.image_size}-pixel images leaves "
                          f"cells under one pixel; use at most {real.image_size}")
    short = {real.class_names[c]: len(i) for c, i in by_class.items() if len(i) < need}
    if short:
        shown = ", ".join(f"{k!r}: {v}" for k, v in list(short.items())[:8])
        raise ConfigError(f"{what} but init.kind {init.kind!r} needs that many real images per class, and "
                          f"{len(short)} class(es) have fewer ({shown}); lower ipc or use init.kind: noise")


@torch.no_grad()
def teacher_confidence(teachers: list, images01: Tensor, c: int, batch: int = 256) -> Tensor:
    """Mean over teachers of p(class c | image): the score `real_confident` ranks whole images by."""
    scores = []
    for lo in range(0, len(images01), batch):
        x = images01[lo:lo + batch]
        probs = torch.stack([t.logits(x).softmax(-1)[:, c] for t in teachers]).mean(0)
        scores.append(probs.cpu())
    return torch.cat(scores)


def candidate_pool(idx: Tensor, c: int, seed: int, candidates: int | None) -> Tensor:
    """Class c's real images in a keyed random order, the first `candidates` of them (None: all;
    RDED: the first `mipc` of a shuffled class folder)."""
    return idx[torch.randperm(len(idx), generator=keyed_generator(seed, "init", c))][:candidates]


def select_real(kind: str, real: ImageSet, idx: Tensor, c: int, ipc: int, seed: int, teachers: list,
                device: torch.device, candidates: int | None) -> Tensor:
    """Indices into `real` of class c's images for IPC slots 0..ipc-1 (deterministic)."""
    pool = candidate_pool(idx, c, seed, None if kind == "real" else candidates)
    if kind == "real":
        return pool[:ipc]
    scores = teacher_confidence(teachers, gather(real, pool).to(device).float().div_(255), c)
    return pool[torch.sort(scores, descending=True, stable=True).indices[:ipc]]


@torch.no_grad()
def crop_loss(teachers: list, patches01: Tensor, c: int, size: int, fill: Tensor, batch: int = 256) -> Tensor:
    """Mean over teachers of −log p(class c | patch), RDED's score (its `cross_entropy`), each patch
    centred on a `size`² canvas of `fill` as RDED's `pad` does: zeros after normalising, i.e. the
    mean colour, so the teacher sees a patch at the scale it has in the stitched image."""
    p = patches01.shape[-1]
    top = (size - p) // 2
    out = []
    for lo in range(0, len(patches01), batch):
        part = patches01[lo:lo + batch]
        x = fill.expand(len(part), -1, size, size).clone()
        x[..., top:top + p, top:top + p] = part
        nll = torch.stack([-t.logits(x).log_softmax(-1)[:, c] for t in teachers]).mean(0)
        out.append(nll.cpu())
    return torch.cat(out)


def select_crops(init: InitConfig, real: ImageSet, idx: Tensor, c: int, ipc: int, seed: int, teachers: list,
                 device: torch.device, mean: Tensor) -> Tensor:
    """Class c's best ipc·stitch² patches `[n, C, p, p]` in [0, 1], best first (RDED's `selector`):
    `crops_per_image` square RandomResizedCrops of `image_size // stitch` px per candidate, each
    image's lowest-loss crop, then the n lowest across images (so n distinct images)."""
    n, m, size = ipc * init.reals_per_image, init.crops_per_image, real.image_size
    pool = candidate_pool(idx, c, seed, init.candidates)
    images = gather(real, pool).to(device).float().div_(255)
    boxes, flips = sample_crops(len(pool), m, size, init.scale, (1.0, 1.0), 0.0, keyed_generator(seed, "crops", c))
    rows = torch.arange(len(pool), device=device).repeat_interleave(m)
    patches = apply_crops(images, boxes.flatten(0, 1), flips.flatten(), size // init.stitch, rows)
    loss = crop_loss(teachers, patches, c, size, mean.to(device)).view(len(pool), m)
    best = loss.argmin(1)
    keep = torch.sort(loss.gather(1, best[:, None])[:, 0], stable=True).indices[:n]
    return patches.view(len(pool), m, *patches.shape[1:])[keep.to(device), best[keep].to(device)]


def stitch(patches: Tensor, ipc: int, factor: int, size: int) -> Tensor:
    """`ipc·factor²` patches, best first → `ipc` images of `size`² (RDED's `mix_images`): cell k
    (row-major) of image i holds patch k·ipc + i; cells are `size // factor` px, the first
    `size % factor` rows and columns one more, patches resized to them by nearest neighbour."""
    cells = [size // factor + (i < size % factor) for i in range(factor)]
    edges = [sum(cells[:i]) for i in range(factor + 1)]
    out = patches.new_empty(ipc, patches.shape[1], size, size)
    for k in range(factor * factor):
        r, q = divmod(k, factor)
        out[..., edges[r]:edges[r + 1], edges[q]:edges[q + 1]] = F.interpolate(
            patches[k * ipc:(k + 1) * ipc], size=(cells[r], cells[q]), mode="nearest")
    return out


def init_images(init: InitConfig, real: ImageSet, by_class: dict[int, Tensor], classes: list[int], ipc_lo: int,
                ipc_hi: int, ipc: int, seed: int, teachers: list, device: torch.device, mean: Tensor,
                std: Tensor) -> Tensor:
    """Starting images `[len(classes) * (ipc_hi - ipc_lo), C, H, W]` in [0, 1] space, class-major.
    `noise` is N(0, 1) in normalised space (mean + std · ε), not clipped, as DC/SRe2L start."""
    out = []
    for c in classes:
        if init.kind == "noise":
            g = keyed_generator(seed, "noise", c)
            eps = torch.randn(ipc, real.channels, real.image_size, real.image_size, generator=g)[ipc_lo:ipc_hi]
            out.append(mean.cpu() + std.cpu() * eps)
        elif init.kind == "confident_crops":
            patches = select_crops(init, real, by_class[c], c, ipc, seed, teachers, device, mean)
            out.append(stitch(patches, ipc, init.stitch, real.image_size)[ipc_lo:ipc_hi].cpu())
        else:
            pick = select_real(init.kind, real, by_class[c], c, ipc, seed, teachers, device,
                               init.candidates)[ipc_lo:ipc_hi]
            out.append(gather(real, pick).float() / 255)
    return torch.cat(out).to(device)
