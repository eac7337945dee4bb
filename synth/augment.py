"""DSA: differentiable siamese augmentation (Zhao & Bilen, 2021).

Matching objectives compare real and synthetic batches *after the same augmentation*, and need the
gradient of that augmentation w.r.t. the synthetic pixels. We follow `DiffAugment` / `ParamDiffAug`
in VICO-UoE/DatasetCondensation `utils.py` (commit 53f63a6, lines 474-650), strategy
'color_crop_cutout_flip_scale_rotate':

- **Normalised space.** The reference augments tensors already normalised with the dataset's
  mean/std (`get_dataset`, `transforms.Normalize`, utils.py line 19 for MNIST), so DSA takes the
  data's per-channel `mean`/`std` and runs its ops on (x − mean) / std: brightness ± 0.5 is half a
  standard deviation, and every zero fill (crop, cutout, scale, rotate) is the dataset mean. Images
  go in and come out in [0, 1] space, so the networks that normalise inside see what they expect.
- ops and their ranges are the reference's: color = brightness ± 0.5, saturation x[0, 2),
  contrast x[0.5, 1.5) applied in turn (lines 565-594); crop = integer translation up to 12.5 % of
  the side with zero fill (597-617); cutout = one zeroed square of half the side (620-640); flip
  with p = 0.5 (556-562); scale = independent x/y factors in [1/1.2, 1.2) (524-539); rotate = ±15
  degrees (542-553); scale/rotate resample bilinearly with zero padding.
- `mode`: 'single' (the reference default, aug_mode 'S', lines 510-515) applies one op, drawn per
  call, from `ops`; 'all' applies every op in order (aug_mode 'M', lines 506-509); 'flip_then_one' is FYI's
  DiffAugment (cvlab-yonsei/FYI `DC_DSA_DM/utils.py` lines 555-563): the random flip (p = 0.5)
  always runs first, then one op drawn from the others.
- Siamese use draws one set of parameters, `params = dsa.sample(generator)`, and applies it to any
  number of batches of any size: `dsa.apply(real, params)`, `dsa.apply(syn, params)`. Like the
  reference's seeded mode, one draw is shared by every image of a batch (real and synthetic batches
  differ in size). `dsa(x, generator)` draws per image instead, for training on synthetic data.

Our choices where it is open: randomness comes from an explicit `torch.Generator` (the reference
reseeds the global RNG); parameters are stored as uniform draws in [0, 1) and turned into pixel
offsets at `apply`, so one draw works for any image size. Digits should drop 'flip' from `ops`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
# Bumped when a DSA draw computes something else, so hashes of synthesis chunks, artefacts and eval
# runs change and nothing made before is silently reused. 2: ops in the data's normalised space.
DSA_REVISION = 2
DSA_MODES = ("single", "flip_then_one", "all")
_DRAWS_PER_OP = {"color": 3, "crop": 2, "cutout": 2, "flip": 1, "scale": 2, "rotate": 1}


def check_dsa(ops: Sequence[str], mode: str) -> None:
    """The ops and draw mode DSA accepts (a recipe's `dsa_ops` / `dsa_mode` are checked with this)."""
    if not ops or any(op not in _DRAWS_PER_OP for op in ops):
        raise ValueError(f"dsa_ops must be a non-empty subset of {list(DSA_OPS)}, got {list(ops)}")
    if mode not in DSA_MODES:
        raise ValueError(f"dsa_mode must be one of {list(DSA_MODES)}, got {mode!r}")
    if mode == "flip_then_one" and ("flip" not in ops or len(ops) < 2):
        raise ValueError(f"dsa_mode flip_then_one needs 'flip' and another op in dsa_ops, got {list(ops)}")


@dataclass(frozen=True)
class DSAParams:
    """One sampled augmentation: the ops to run and, per op, uniform draws of shape (n, k);
    n is 1 (shared by the whole batch) or the batch size (one draw per image)."""

    ops: tuple[str, ...]
    draws: dict[str, Tensor]


class DSA:
    """Differentiable siamese augmentation over a configurable set of `ops` (see module doc), in the
    space normalised by the data's per-channel `mean` and `std` (of [0, 1] pixels)."""

    def __init__(
        self,
        *,
        mean: Sequence[float] | Tensor,
        std: Sequence[float] | Tensor,
        ops: Sequence[str] = DSA_OPS,
        mode: str = "single",
        prob_flip: float = 0.5,
        ratio_scale: float = 1.2,
        ratio_rotate: float = 15.0,
        ratio_crop_pad: float = 0.125,
        ratio_cutout: float = 0.5,
        brightness: float = 1.0,
        saturation: float = 2.0,
        contrast: float = 0.5,
    ):
        check_dsa(ops, mode)
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.ops = tuple(ops)
        self.mode = mode
        self.prob_flip = prob_flip
        self.ratio_scale = ratio_scale
        self.ratio_rotate = ratio_rotate
        self.ratio_crop_pad = ratio_crop_pad
        self.ratio_cutout = ratio_cutout
        self.brightness = brightness
        self.saturation = saturation
        self.contrast = contrast

    def sample(self, generator: torch.Generator | None = None, n: int = 1) -> DSAParams:
        """Draw the ops to run and their parameters; n = 1 shares them across a batch (siamese)."""
        device = generator.device if generator is not None else "cpu"
        ops = self.ops
        if self.mode != "all":
            first = ("flip",) if self.mode == "flip_then_one" else ()
            rest = [op for op in ops if op not in first]
            ops = first + (rest[int(torch.randint(len(rest), (1,), generator=generator, device=device))],)
        draws = {op: torch.rand(n, _DRAWS_PER_OP[op], generator=generator, device=device) for op in ops}
        return DSAParams(ops, draws)

    def apply(self, x: Tensor, params: DSAParams) -> Tensor:
        """Augment x (N, C, H, W) in [0, 1] space with `params`, in normalised space; differentiable w.r.t. x."""
        mean, std = self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)
        z = (x - mean) / std
        for op in params.ops:
            u = params.draws[op].to(x.device)
            if u.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"DSA params drawn for {u.shape[0]} images, batch has {x.shape[0]}")
            z = getattr(self, f"_{op}")(z, u)
        return z * std + mean

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Non-siamese use: independent parameters for every image of x."""
        return self.apply(x, self.sample(generator, n=x.shape[0]))

    # --- ops on normalised tensors: u holds uniform draws, shape (n, k) with n in {1, N} ----------

    def _color(self, x: Tensor, u: Tensor) -> Tensor:
        b, s, c = (u[:, i].view(-1, 1, 1, 1).to(x.dtype) for i in range(3))
        x = x + (b - 0.5) * self.brightness
        mean = x.mean(dim=1, keepdim=True)
        x = (x - mean) * (s * self.saturation) + mean
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean) * (c + self.contrast) + mean

    def _crop(self, x: Tensor, u: Tensor) -> Tensor:
        """Translate by whole pixels, filling with zeros (the reference pads by one zero pixel and
        clamps indices into it)."""
        n_img, chans, height, width = x.shape
        rows = torch.arange(height, device=x.device) + _shift(u[:, 0], height, self.ratio_crop_pad)[:, None] + 1
        cols = torch.arange(width, device=x.device) + _shift(u[:, 1], width, self.ratio_crop_pad)[:, None] + 1
        rows = rows.clamp(0, height + 1).expand(n_img, height)
        cols = cols.clamp(0, width + 1).expand(n_img, width)
        x = F.pad(x, [1, 1, 1, 1])
        x = x.gather(2, rows[:, None, :, None].expand(n_img, chans, height, width + 2))
        return x.gather(3, cols[:, None, None, :].expand(n_img, chans, height, width))

    def _cutout(self, x: Tensor, u: Tensor) -> Tensor:
        """Zero one square of `ratio_cutout` of the side, centred anywhere in the image."""
        _, _, height, width = x.shape

        def inside(draw: Tensor, side: int) -> Tensor:
            size = int(side * self.ratio_cutout + 0.5)
            centre = (draw * (side + 1 - size % 2)).floor().long()
            start = (centre - size // 2)[:, None]
            pos = torch.arange(side, device=x.device)
            return (pos >= start) & (pos < start + size)

        hole = inside(u[:, 0], height)[:, :, None] & inside(u[:, 1], width)[:, None, :]
        return x * (~hole).to(x.dtype)[:, None]

    def _flip(self, x: Tensor, u: Tensor) -> Tensor:
        return torch.where(u.view(-1, 1, 1, 1) < self.prob_flip, x.flip(3), x)

    def _scale(self, x: Tensor, u: Tensor) -> Tensor:
        lo, hi = 1.0 / self.ratio_scale, self.ratio_scale
        sx, sy = u[:, 0] * (hi - lo) + lo, u[:, 1] * (hi - lo) + lo
        zero = torch.zeros_like(sx)
        theta = torch.stack([torch.stack([sx, zero, zero], 1), torch.stack([zero, sy, zero], 1)], 1)
        return _warp(x, theta)

    def _rotate(self, x: Tensor, u: Tensor) -> Tensor:
        angle = (u[:, 0] - 0.5) * 2 * self.ratio_rotate / 180 * math.pi
        cos, sin, zero = angle.cos(), angle.sin(), torch.zeros_like(angle)
        theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        return _warp(x, theta)


def _shift(draw: Tensor, side: int, ratio: float) -> Tensor:
    """Map uniform draws to integer shifts in [-s, s], s = round(side * ratio)."""
    s = int(side * ratio + 0.5)
    return (draw * (2 * s + 1)).floor().long() - s


def _warp(x: Tensor, theta: Tensor) -> Tensor:
    theta = theta.to(x.dtype).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
