"""`distribution_matching`: DM (VICO-UoE/DatasetCondensation `main_DM.py`).

Every step samples a fresh randomly initialised network (ConvNet-3 by default) and, per class,
matches the mean embedding of a real batch with that of the synthetic images under one siamese
DSA draw (`synth.objectives.distribution_matching_loss`). SGD lr 1.0, momentum 0.5 on normalised
pixels, constant lr, no clipping during optimisation: all as the reference. The classes share
their forward passes (`micro_batch` images each on a CPU), which gives the reference's loss.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor

from distill.config import Strict
from synth.config import ImageOptim
from synth.methods import (SYNTH_METHODS, MatchingOptions, SynthContext, class_groups, embedder, images_per_pass,
                           make_dsa)
from synth.objectives import distribution_matching_loss


class DMOptions(MatchingOptions):
    net: str = "convnet3"  # the random embedding network's architecture
    batch_real: int = Field(256, ge=1)  # real images per class per step
    optim: ImageOptim = ImageOptim(name="sgd", lr=1.0, momentum=0.5, schedule="constant")
    clip: bool = False


@SYNTH_METHODS.register("distribution_matching")
class DistributionMatching:
    Options: ClassVar[type[Strict]] = DMOptions
    needs_teachers: ClassVar[bool] = False

    def __init__(self, opts: DMOptions, ctx: SynthContext):
        self.opts, self.ctx, self.clip = opts, ctx, opts.clip
        self.dsa = make_dsa(opts, ctx)

    def image_optim(self) -> ImageOptim:
        return self.opts.optim

    def loss(self, x: Tensor, y: Tensor, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        net = self.ctx.random_network(self.opts.net, generator).train().requires_grad_(False)
        classes, syn = class_groups(x, y)
        real = [self.ctx.real_batch(c, self.opts.batch_real, generator) for c in classes]
        loss = distribution_matching_loss(embedder(net), real, syn, self.dsa, generator,
                                          images_per_pass(self.opts, net, self.ctx.device))
        return {"loss": loss, "dm": loss.detach()}
