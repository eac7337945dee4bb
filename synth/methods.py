"""The synthesis-method seam: `SYNTH_METHODS` (name → class) and the one small interface.

A method is one module holding one registered class with
- `Options`: a `Strict` model of its recipe `options` (validated when the recipe loads);
- `needs_teachers`: whether it needs trained teachers (checked before compute);
- `__init__(opts, ctx)`: build what it needs from the `SynthContext` (real data, teachers, stats);
- `loss(x, y, step, generator) -> {"loss": ..., named terms}` on synthetic images `x` in [0, 1].

Importing the `synth` package imports every method module, which registers itself here.
The loop around it (`synth.run.optimise`) is shared: it owns the pixels, the optimiser
(`opts.optim`), the schedule, clipping and FYI — with `flip: true`, `x, y` arrive as
`flip_concat(x, y)`, so a method never needs to know about flipping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import torch
from pydantic import field_validator
from torch import Tensor, nn

from distill.config import Strict
from distill.data import ImageSet
from distill.models import create_model
from distill.registry import Registry
from synth.augment import DSA, DSA_OPS
from synth.config import ImageOptim
from synth.init import gather


class SynthMethod(Protocol):
    Options: ClassVar[type[Strict]]
    needs_teachers: ClassVar[bool]
    clip: bool  # clamp pixels to [0, 1] after every step

    def __init__(self, opts: Strict, ctx: "SynthContext") -> None: ...

    def image_optim(self) -> ImageOptim: ...

    def loss(self, x: Tensor, y: Tensor, step: int, generator: torch.Generator) -> dict[str, Tensor]: ...


SYNTH_METHODS: Registry[type[SynthMethod]] = Registry("synthesis method")


@dataclass
class SynthContext:
    """What a method may use for one chunk of classes. Real images stay uint8 on the CPU (or on
    disk, for ImageFolder data); batches are drawn from them per step."""

    real: ImageSet
    by_class: dict[int, Tensor]  # class → indices into real
    teachers: list  # teachers.teacher.Teacher, frozen, on `device`
    mean: Tensor  # [1, C, 1, 1] per-channel mean of the real training images, in [0, 1]
    std: Tensor
    device: torch.device
    ipc: int  # the recipe's images per class (DC's loop lengths depend on it)
    seed: int

    @property
    def num_classes(self) -> int:
        return self.real.num_classes

    @property
    def channels(self) -> int:
        return self.real.channels

    @property
    def image_size(self) -> int:
        return self.real.image_size

    def real_batch(self, c: int, n: int, generator: torch.Generator) -> Tensor:
        """n random real images of class c (without replacement when the class has n), [0, 1]."""
        idx = self.by_class[c]
        pick = idx[torch.randperm(len(idx), generator=generator)[:n]]
        return gather(self.real, pick).to(self.device).float().div_(255)

    def random_network(self, arch: str, generator: torch.Generator) -> nn.Module:
        """A freshly initialised network taking [0, 1] images (normalised inside with the data's
        mean/std), its initial weights drawn from `generator` so a chunk is reproducible."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            model = create_model(arch, self.num_classes, self.channels, self.image_size, self.real.class_names,
                                 mean=tuple(self.mean.flatten().tolist()), std=tuple(self.std.flatten().tolist()))
        return model.to(self.device)


def embedder(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """[0, 1] images → the embedding DM matches: ConvNet's `embed`, else timm's pre-logits."""
    net = model.net
    if hasattr(net, "embed"):
        return lambda x: net.embed(model.preprocess(x))
    if hasattr(net, "forward_head"):
        return lambda x: net.forward_head(net.forward_features(model.preprocess(x)), pre_logits=True)
    raise ValueError(f"{model.arch}: no embedding (needs `embed` or timm's `forward_head`)")


class DSAOptions(Strict):
    """Differentiable siamese augmentation for the matching methods (DM, DC/DSA). `dsa: false` on
    gradient matching is plain DC; for digits drop "flip" from `dsa_ops`."""

    dsa: bool = True
    dsa_ops: list[str] = list(DSA_OPS)

    @field_validator("dsa_ops")
    @classmethod
    def _ops(cls, v: list[str]) -> list[str]:
        if not v or any(op not in DSA_OPS for op in v):
            raise ValueError(f"dsa_ops must be a non-empty subset of {list(DSA_OPS)}, got {v}")
        return v


def make_dsa(enabled: bool, ops: list[str]) -> DSA | None:
    return DSA(ops=ops) if enabled else None


def class_groups(x: Tensor, y: Tensor) -> tuple[list[int], list[Tensor]]:
    """Classes present in y (sorted) and x's rows of each."""
    classes = torch.unique(y).tolist()
    return classes, [x[y == c] for c in classes]

