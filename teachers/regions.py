"""FKD region labels, pure tensor functions: sample crop boxes, cut them out, compress the teacher's
probabilities, and FerKD's SelfMix (mix a crop with another crop of the same image).

A crop bank stores, per image, M boxes + flip flags + a top-k label per crop (FKD, Shen & Xing).
The crop operator (`sample_crops`, `apply_crops`) lives in `distill.augment`, the one
implementation online training, store generation and store replay share; it is re-exported here.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from distill.augment import apply_crops, image_hw, sample_crops  # noqa: F401  (the one crop operator, re-exported)

# ---------------------------------------------------------------------------- label compression


def compress_topk(probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Keep each row's k largest probabilities (descending) as fp16 and their class ids as int16
    (int32 past 32,767 classes). The FKD reference keeps 5 of 1,000; the rest is rebuilt on read."""
    num_classes = probs.shape[-1]
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be in [1, {num_classes}], got {k}")
    values, indices = torch.topk(probs.float(), k, dim=-1, largest=True, sorted=True)
    index_dtype = torch.int16 if num_classes <= torch.iinfo(torch.int16).max else torch.int32
    return values.half(), indices.to(index_dtype)


def decompress(values: Tensor, indices: Tensor, num_classes: int, mode: str = "marginal_smoothing") -> Tensor:
    """Rebuild `[B, num_classes]` float32 probabilities from a top-k label.

    marginal_smoothing: the k stored values, the missing mass 1 − Σtopk shared evenly by the other
    C − k classes (FKD's recommended `marginal_smoothing_k5`); marginal_renorm: the k values
    rescaled to sum 1; hard: one-hot of the largest stored value. fp16 rounding can push Σtopk a
    hair over 1, so the missing mass is clamped at 0.
    """
    values = values.float()
    idx = indices.long()
    k = values.shape[-1]
    if mode == "hard":
        top = idx.gather(-1, values.argmax(dim=-1, keepdim=True))
        return torch.zeros(*values.shape[:-1], num_classes, device=values.device).scatter_(-1, top, 1.0)
    if mode == "marginal_renorm":
        out = torch.zeros(*values.shape[:-1], num_classes, device=values.device).scatter_(-1, idx, values)
        return out / out.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    if mode == "marginal_smoothing":
        rest = (1.0 - values.sum(dim=-1, keepdim=True)).clamp_min(0.0)
        fill = rest / (num_classes - k) if num_classes > k else torch.zeros_like(rest)
        out = fill.expand(*values.shape[:-1], num_classes).clone()
        return out.scatter_(-1, idx, values)
    raise ValueError(f"unknown mode {mode!r}; use marginal_smoothing, marginal_renorm or hard")


# ------------------------------------------------------------------------------------- SelfMix


def _standard_gamma(shape_param: float, size: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    """Gamma(a, 1) draws from `generator` (torch.distributions takes none): Marsaglia–Tsang, with
    the a < 1 case boosted as Gamma(a + 1) · U^(1/a)."""
    a = shape_param if shape_param >= 1.0 else shape_param + 1.0
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(size, dtype=torch.float64)
    todo = torch.ones(size, dtype=torch.bool)
    while todo.any():  # acceptance is > 95%, so this loops a couple of times
        x = torch.randn(size, generator=generator, dtype=torch.float64)
        u = torch.rand(size, generator=generator, dtype=torch.float64)
        v = (1.0 + c * x) ** 3
        ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp_min(1e-300)))
        take = ok & todo
        out[take] = (d * v)[take]
        todo &= ~ok
    if shape_param < 1.0:
        out = out * torch.rand(size, generator=generator, dtype=torch.float64) ** (1.0 / shape_param)
    return out


def sample_selfmix(
    crops_per_image: int,
    num_images: int,
    alpha: float = 1.0,
    mode: str = "cutmix",
    image_size: int | tuple[int, int] = 224,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Draw FerKD SelfMix parameters for N images × M crops each.

    partner `[N, M]`: the crop (0..M-1, within the same image's group) that crop m is mixed with.
    Ours: a random M-cycle, so no crop is its own partner when M > 1 (a plain permutation would
    leave some crops unmixed). lam `[N, M]` ~ Beta(alpha, alpha). For cutmix, boxes `[N, M, 4]` are
    the pasted regions in the crop's pixel frame `(x1, y1, x2, y2)`: side sqrt(1 − λ) of the crop,
    uniform centre, clipped at the border (so the kept area is recomputed in `apply_selfmix`).
    For mixup, boxes is None, which is how `apply_selfmix` tells the modes apart.
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if mode not in ("cutmix", "mixup"):
        raise ValueError(f"unknown mode {mode!r}; use cutmix or mixup")
    N, M = num_images, crops_per_image
    order = torch.rand(N, M, generator=generator).argsort(dim=1)  # a random ordering per image
    partner = torch.empty(N, M, dtype=torch.long)
    partner.scatter_(1, order, order.roll(-1, dims=1))  # each crop points to the next in the cycle
    g1 = _standard_gamma(alpha, (N, M), generator)
    g2 = _standard_gamma(alpha, (N, M), generator)
    lam = (g1 / (g1 + g2)).float()
    if mode == "mixup":
        return partner, lam, None

    H, W = image_hw(image_size)
    cut = torch.sqrt(1.0 - lam)
    cut_w, cut_h = torch.floor(W * cut), torch.floor(H * cut)
    centre = torch.rand(N, M, 2, generator=generator)
    cx, cy = torch.floor(centre[..., 0] * W), torch.floor(centre[..., 1] * H)
    half_w, half_h = torch.div(cut_w, 2, rounding_mode="floor"), torch.div(cut_h, 2, rounding_mode="floor")
    boxes = torch.stack(
        [(cx - half_w).clamp(0, W), (cy - half_h).clamp(0, H), (cx + half_w).clamp(0, W), (cy + half_h).clamp(0, H)],
        dim=-1,
    )
    return partner, lam, boxes


def _global_partner(partner: Tensor) -> Tensor:
    """Within-group partner ids `[N, M]` → row ids into the flat `[N*M]` batch."""
    N, M = partner.shape
    base = torch.arange(N, device=partner.device)[:, None] * M
    return (base + partner.long()).reshape(-1)


def apply_selfmix(crops: Tensor, partner: Tensor, lam: Tensor, boxes: Tensor | None) -> tuple[Tensor, Tensor]:
    """Mix each crop with its partner crop of the same image; crops are `[N*M, C, h, w]`, image-major
    (rows n*M .. n*M+M-1 are image n's crops).

    cutmix (boxes given): the partner's pixels inside the box replace ours, and λ becomes the
    fraction of our own pixels left, after clipping and whole-pixel rounding. mixup (boxes None):
    λ·x_i + (1 − λ)·x_partner. Returns the mixed crops and `lam_actual` `[N, M]`.
    """
    N, M = partner.shape
    if crops.shape[0] != N * M:
        raise ValueError(f"crops has {crops.shape[0]} rows, partner says {N}×{M}")
    src = crops[_global_partner(partner.to(crops.device))]
    if boxes is None:
        lam_flat = lam.to(device=crops.device, dtype=crops.dtype).reshape(-1, 1, 1, 1)
        return lam_flat * crops + (1.0 - lam_flat) * src, lam.to(crops.device).clone()

    h, w = crops.shape[-2:]
    b = boxes.to(crops.device).reshape(-1, 4)
    xs = torch.arange(w, device=crops.device, dtype=b.dtype)
    ys = torch.arange(h, device=crops.device, dtype=b.dtype)
    in_x = (xs[None, :] >= b[:, 0:1]) & (xs[None, :] < b[:, 2:3])  # [B, w]
    in_y = (ys[None, :] >= b[:, 1:2]) & (ys[None, :] < b[:, 3:4])  # [B, h]
    pasted = in_y[:, :, None] & in_x[:, None, :]  # [B, h, w]
    mixed = torch.where(pasted[:, None], src, crops)
    lam_actual = 1.0 - pasted.flatten(1).float().mean(dim=1)
    return mixed, lam_actual.reshape(N, M)


def mix_labels(probs: Tensor, partner: Tensor, lam: Tensor) -> Tensor:
    """λ·y_i + (1 − λ)·y_partner for image-major `probs [N*M, C]`; pass `lam_actual` for cutmix."""
    src = probs[_global_partner(partner.to(probs.device))]
    lam_col = lam.to(device=probs.device, dtype=probs.dtype).reshape(-1, 1)
    return lam_col * probs + (1.0 - lam_col) * src
