"""Matching objectives of dataset condensation, as pure functions of tensors and frozen networks.

- `flip_concat`: FYI (cvlab-yonsei/FYI `BatchAug`), the synthetic batch plus its mirror image.
- `bn_matching_loss`: SRe2L recover (VILA-Lab/SRe2L `BNFeatureHook`, `recover_cifar.py`).
- `distribution_matching_loss`: DM (VICO-UoE/DatasetCondensation `main_DM.py`).
- `gradient_matching_loss`: DC / DSA (VICO-UoE/DatasetCondensation `main.py`, `match_loss` 'ours');
  `mean_ce_grads`, the CE gradient it matches, accumulated over passes of a few images.
- `random_jitter`: SRe2L's crop / flip / roll of the images before the teacher sees them.

The synthesis loops (optimisers, schedules, sampling real batches) live with their callers.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from synth.augment import DSA


def flip_concat(images: Tensor, labels: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """FYI's flip-aware batch: cat([x, x mirrored left-right]) with labels repeated in the same order.
    Deterministic on purpose: every update sees both orientations (random flipping does not help)."""
    doubled = torch.cat([images, images.flip(-1)], dim=0)
    return doubled, (None if labels is None else torch.cat([labels, labels], dim=0))


def bn_matching_loss(
    model: nn.Module,
    images: Tensor,
    targets: Tensor,
    first_bn_weight: float = 10.0,
    r_bn: float = 0.01,
) -> dict[str, Tensor]:
    """SRe2L recover objective: CE(f(x), y) + r_bn * sum_l w_l (||mu_l(x) - running_mean_l||_2
    + ||var_l(x) - running_var_l||_2), with w_0 = first_bn_weight and w_l = 1 after.

    Statistics are those of each BatchNorm2d's *input* over (N, H, W), biased variance, as in the
    reference's forward hooks. The model must be a frozen teacher in eval mode: in train mode its
    BN layers would normalise with batch statistics and overwrite their running ones, so we refuse.
    Returns {"loss", "ce", "bn"}; "bn" is the weighted sum before r_bn.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise ValueError(f"bn_matching_loss needs BatchNorm2d layers; {type(model).__name__} has none")
    if any(m.training for m in bns):
        raise ValueError(f"bn_matching_loss needs {type(model).__name__} in eval mode (call model.eval())")

    gaps: list[Tensor] = []

    def hook(module: nn.BatchNorm2d, inputs: tuple[Tensor, ...], _output: Tensor) -> None:
        x = inputs[0]
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        gaps.append(torch.norm(mean - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

    handles = [m.register_forward_hook(hook) for m in bns]
    try:
        logits = model(images)
    finally:
        for h in handles:
            h.remove()
    ce = F.cross_entropy(logits, targets)
    weights = [first_bn_weight] + [1.0] * (len(gaps) - 1)
    bn = sum(w * g for w, g in zip(weights, gaps))
    return {"loss": ce + r_bn * bn, "ce": ce, "bn": bn}


def _siamese(dsa: DSA | None, generator: torch.Generator | None, real: Tensor, syn: Tensor) -> tuple[Tensor, Tensor]:
    """Apply one DSA draw to both batches (the reference reseeds with the same seed for both)."""
    if dsa is None:
        return real, syn
    params = dsa.sample(generator)
    return dsa.apply(real, params), dsa.apply(syn, params)


def _chunks(x: Tensor, micro_batch: int | None) -> tuple[Tensor, ...]:
    return (x,) if micro_batch is None else x.split(micro_batch)


def _mean_embeddings(embed_fn: Callable[[Tensor], Tensor], batches: list[Tensor], micro_batch: int | None) -> Tensor:
    """[len(batches), D]: each batch's mean embedding, all batches passed through together in
    passes of `micro_batch` images (None: one pass)."""
    emb = torch.cat([embed_fn(c) for c in _chunks(torch.cat(batches), micro_batch)])
    return torch.stack([e.mean(dim=0) for e in emb.split([len(b) for b in batches])])


def distribution_matching_loss(
    embed_fn: Callable[[Tensor], Tensor],
    real_by_class: Sequence[Tensor],
    syn_by_class: Sequence[Tensor],
    dsa: DSA | None = None,
    generator: torch.Generator | None = None,
    micro_batch: int | None = None,
) -> Tensor:
    """DM: sum over classes c of ||mean embed(real_c) - mean embed(syn_c)||^2.

    `real_by_class[c]` and `syn_by_class[c]` are batches of class c. Real embeddings carry no
    gradient (the reference detaches them). With `dsa`, each class gets one siamese draw applied to
    both its real and synthetic batch; otherwise augment in the caller. `embed_fn` is a randomly
    initialised network's `embed` whose parameters the caller has frozen (requires_grad False).

    All classes share the forward passes: one for the real images and one for the synthetic ones,
    as the reference's BatchNorm branch (main_DM.py lines 165-187); or, for a network that
    normalises each image on its own (ConvNet's instance norm: the reference loops classes, lines
    149-163, with the same result), passes of `micro_batch` images, which run faster on a CPU.
    """
    if not syn_by_class or len(real_by_class) != len(syn_by_class):
        raise ValueError(f"need one batch per class on both sides; got {len(real_by_class)} real, {len(syn_by_class)} synthetic")
    pairs = [_siamese(dsa, generator, real, syn) for real, syn in zip(real_by_class, syn_by_class)]
    with torch.no_grad():
        real_means = _mean_embeddings(embed_fn, [r for r, _ in pairs], micro_batch)
    syn_means = _mean_embeddings(embed_fn, [s for _, s in pairs], micro_batch)
    return ((real_means - syn_means) ** 2).sum()


def gradient_distance(grads_syn: Sequence[Tensor], grads_real: Sequence[Tensor], eps: float = 1e-6) -> Tensor:
    """The reference's layer-wise distance ('ours' in `match_loss` / `distance_wb`).

    Each gradient tensor is viewed as rows, one per output channel (conv (O, I, h, w) → (O, I*h*w),
    linear (O, I) as is, 3-D (C, h, w) → (C, h*w)); the distance is sum over rows of
    1 - cos(row_syn, row_real), with eps added to the norm product. 1-D tensors (biases, norm
    weights) contribute 0, as in the reference.
    """
    total = grads_syn[0].new_zeros(())
    for gs, gr in zip(grads_syn, grads_real):
        if gs.dim() == 1:
            continue
        gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        cos = (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + eps)
        total = total + (1 - cos).sum()
    return total


def mean_ce_grads(net: nn.Module, x: Tensor, y: Tensor, params: Sequence[Tensor], micro_batch: int | None = None,
                  create_graph: bool = False) -> tuple[Tensor, ...]:
    """d CE(net(x), y) / d params, CE averaged over x, accumulated over passes of `micro_batch`
    images (None: one pass; with create_graph, always one pass)."""
    if micro_batch is None or create_graph:
        return torch.autograd.grad(F.cross_entropy(net(x), y), params, create_graph=create_graph)
    total = None
    for xc, yc in zip(x.split(micro_batch), y.split(micro_batch)):
        grads = torch.autograd.grad(F.cross_entropy(net(xc), yc, reduction="sum"), params)
        total = list(grads) if total is None else [t.add_(g) for t, g in zip(total, grads)]
    return tuple(t.div_(len(x)) for t in total)


def gradient_matching_loss(
    net: nn.Module,
    classes: Sequence[int],
    real_by_class: Sequence[Tensor],
    syn_by_class: Sequence[Tensor],
    dsa: DSA | None = None,
    generator: torch.Generator | None = None,
    micro_batch: int | None = None,
) -> Tensor:
    """DC / DSA: sum over classes c of gradient_distance(dCE(syn_c)/dθ, dCE(real_c)/dθ), the
    reference's per-class loop (main.py lines 179-199).

    θ are the net's parameters that require grad. Real gradients are constants (accumulated over
    passes of `micro_batch` images: exact when the network normalises each image on its own, or its
    BatchNorm is frozen); synthetic ones keep their graph (create_graph) so the loss back-propagates
    to the synthetic images. With `dsa`, each class gets one siamese draw for both batches.
    BatchNorm handling (the reference freezes BN statistics on a real batch first) is the caller's.
    """
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"gradient_matching_loss: {type(net).__name__} has no parameters requiring grad")
    if not syn_by_class or not len(classes) == len(real_by_class) == len(syn_by_class):
        raise ValueError(f"need one batch per class on both sides; got {len(classes)} classes, "
                         f"{len(real_by_class)} real, {len(syn_by_class)} synthetic")
    loss = syn_by_class[0].new_zeros(())
    for c, real, syn in zip(classes, real_by_class, syn_by_class):
        if real.shape[0] == 0:
            raise ValueError(f"gradient_matching_loss: no real images of class {c}")
        real, syn = _siamese(dsa, generator, real, syn)
        target = torch.full((len(real),), c, device=real.device)
        grads_real = [g.detach() for g in mean_ce_grads(net, real, target, params, micro_batch)]
        grads_syn = mean_ce_grads(net, syn, target[:1].expand(len(syn)), params, create_graph=True)
        loss = loss + gradient_distance(grads_syn, grads_real)
    return loss


def random_jitter(
    x: Tensor,
    generator: torch.Generator | None = None,
    max_shift: int = 4,
    flip: bool = True,
    crop_scale: tuple[float, float] | None = None,
) -> Tensor:
    """SRe2L's jitter before each teacher pass; one draw for the whole batch, as the reference's
    torchvision transforms on a batched tensor do.

    Optional random-resized crop (area fraction in `crop_scale`, aspect ratio in [3/4, 4/3], resized
    back bilinearly; the ImageNet recipe uses (0.08, 1), the CIFAR one none), then a horizontal flip
    with p = 0.5, then a circular roll by (dy, dx) in [0, max_shift]^2 (the reference's `torch.roll`).
    Our simplification: out-of-range crop sides are clamped instead of torchvision's retry loop.
    """
    device = generator.device if generator is not None else "cpu"

    def uniform() -> float:
        return float(torch.rand((), generator=generator, device=device))

    _, _, height, width = x.shape
    if crop_scale is not None:
        area = crop_scale[0] + (crop_scale[1] - crop_scale[0]) * uniform()
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * uniform())
        h = min(height, max(1, round(height * math.sqrt(area / ratio))))
        w = min(width, max(1, round(width * math.sqrt(area * ratio))))
        top, left = int(uniform() * (height - h + 1)), int(uniform() * (width - w + 1))
        x = x[:, :, top : top + h, left : left + w]
        x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)
    if flip and uniform() < 0.5:
        x = x.flip(-1)
    shifts = (int(uniform() * (max_shift + 1)), int(uniform() * (max_shift + 1)))
    return torch.roll(x, shifts=shifts, dims=(2, 3))
