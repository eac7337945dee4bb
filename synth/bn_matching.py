"""`bn_matching`: SRe2L's recover step (VILA-Lab/SRe2L `recover_cifar.py` / `data_synthesis.py`).

Each step jitters the synthetic batch (one random crop/flip/roll draw for the batch), then
minimises CE(teacher(x), y) + r_bn · Σ_l w_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂) against the frozen
teacher's BatchNorm running statistics (`synth.objectives.bn_matching_loss`); first layer w = 10.
Adam lr 0.25, betas (0.5, 0.9), cosine to 0, pixels clipped to the valid range after each step,
as the reference. With several teachers the loss is their mean (each teacher's BN statistics).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.config import Strict
from distill.errors import ConfigError
from synth.config import ImageOptim
from synth.methods import SYNTH_METHODS, SynthContext
from synth.objectives import bn_matching_loss, random_jitter


class BNMatchingOptions(Strict):
    first_bn_weight: float = Field(10.0, ge=0)
    r_bn: float = Field(0.01, ge=0)
    jitter: int = Field(4, ge=0)  # max roll in pixels (SRe2L CIFAR: 4; ImageNet: 32)
    jitter_flip: bool = True  # SRe2L's random flip; set false for data whose mirror changes the class
    crop_scale: tuple[float, float] | None = None  # random-resized crop before the teacher (ImageNet: (0.08, 1))
    optim: ImageOptim = ImageOptim(name="adam", lr=0.25, betas=(0.5, 0.9), schedule="cosine")
    clip: bool = True


@SYNTH_METHODS.register("bn_matching")
class BNMatching:
    Options: ClassVar[type[Strict]] = BNMatchingOptions
    needs_teachers: ClassVar[bool] = True

    def __init__(self, opts: BNMatchingOptions, ctx: SynthContext):
        self.opts, self.clip = opts, opts.clip
        self.teachers = [t.model for t in ctx.teachers]
        for t in ctx.teachers:
            check_has_batchnorm(t.name, t.model)

    def image_optim(self) -> ImageOptim:
        return self.opts.optim

    def loss(self, x: Tensor, y: Tensor, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        o = self.opts
        xj = random_jitter(x, generator, max_shift=o.jitter, flip=o.jitter_flip, crop_scale=o.crop_scale)
        terms = [bn_matching_loss(t, xj, y, o.first_bn_weight, o.r_bn) for t in self.teachers]
        return {k: torch.stack([t[k] for t in terms]).mean() for k in terms[0]}


def check_has_batchnorm(name: str, model: nn.Module) -> None:
    """bn_matching matches BatchNorm running statistics: a teacher without any cannot be used."""
    if not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
        raise ConfigError(f"teachers: {name} ({getattr(model, 'arch', type(model).__name__)}) has no BatchNorm2d "
                          f"layer; bn_matching matches BN statistics, so use a BN teacher (e.g. a ResNet)")
