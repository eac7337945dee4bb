"""`gradient_matching`: DC / DSA (VICO-UoE/DatasetCondensation `main.py`).

Every `outer_loop` steps a fresh random network; each step matches, class by class, the gradient
of CE on a real batch with that on the synthetic images (layer-wise 1 − cos distance,
`synth.objectives.gradient_matching_loss`, one siamese DSA draw per class when `dsa`); between
steps the network trains `inner_loop` epochs on the (detached) synthetic set with SGD `lr_net`,
as the reference's inner loop. Networks with BatchNorm get the reference's treatment (main.py
lines 163-173): a forward pass on 16 real images of every class in train mode, then BN frozen
(eval) for the matching. Real gradients and inner-loop steps are accumulated over passes of
`micro_batch` images on a CPU (the same gradients, faster there).

`iterations` counts synthetic-image updates (the reference's Iteration × outer_loop).
Loop lengths by IPC from the reference's `get_loops` (1: 1/1, 10: 10/50, 20: 20/25, 30: 30/20,
40: 40/15, 50: 50/10); other IPCs take the nearest listed IPC's (our choice).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from distill.config import Strict
from synth.config import ImageOptim
from synth.methods import SYNTH_METHODS, MatchingOptions, SynthContext, class_groups, images_per_pass, make_dsa
from synth.objectives import gradient_matching_loss, mean_ce_grads

BN_IMAGES_PER_CLASS = 16  # the reference's BNSizePC
REFERENCE_LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}


def reference_loops(ipc: int) -> tuple[int, int]:
    nearest = min(REFERENCE_LOOPS, key=lambda k: (abs(k - ipc), k))
    return REFERENCE_LOOPS[nearest]


class GMOptions(MatchingOptions):
    net: str = "convnet3"
    batch_real: int = Field(256, ge=1)  # real images per class per step
    outer_loop: int | None = Field(None, ge=1)  # None: the reference's for this IPC
    inner_loop: int | None = Field(None, ge=0)
    lr_net: float = Field(0.01, gt=0)
    batch_train: int = Field(256, ge=1)  # inner-loop batch over the synthetic set
    optim: ImageOptim = ImageOptim(name="sgd", lr=0.1, momentum=0.5, schedule="constant")
    clip: bool = False


@SYNTH_METHODS.register("gradient_matching")
class GradientMatching:
    Options: ClassVar[type[Strict]] = GMOptions
    needs_teachers: ClassVar[bool] = False

    def __init__(self, opts: GMOptions, ctx: SynthContext):
        self.opts, self.ctx, self.clip = opts, ctx, opts.clip
        self.dsa = make_dsa(opts, ctx)
        outer, inner = reference_loops(ctx.ipc)
        self.outer = opts.outer_loop or outer
        self.inner = inner if opts.inner_loop is None else opts.inner_loop
        self.net: nn.Module | None = None
        self.net_opt: torch.optim.Optimizer | None = None
        self.passes: int | None = None  # images per forward pass for this network

    def image_optim(self) -> ImageOptim:
        return self.opts.optim

    def _train_inner(self, x: Tensor, y: Tensor, generator: torch.Generator) -> None:
        """`inner_loop` epochs of SGD on the synthetic set, DSA per image as the reference."""
        params = list(self.net.parameters())
        for _ in range(self.inner):
            order = torch.randperm(len(x), generator=generator).to(x.device)
            for lo in range(0, len(x), self.opts.batch_train):
                idx = order[lo:lo + self.opts.batch_train]
                xb = x[idx] if self.dsa is None else self.dsa(x[idx], generator)
                for p, g in zip(params, mean_ce_grads(self.net, xb, y[idx], params, self.passes)):
                    p.grad = g
                self.net_opt.step()

    def loss(self, x: Tensor, y: Tensor, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        if step % self.outer == 0:
            self.net = self.ctx.random_network(self.opts.net, generator).train()
            self.net_opt = torch.optim.SGD(self.net.parameters(), lr=self.opts.lr_net)
            self.passes = images_per_pass(self.opts, self.net, self.ctx.device)
        elif self.inner:
            self.net.train()
            self._train_inner(x.detach(), y, generator)
        classes, syn = class_groups(x, y)
        bns = [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bns:  # BN statistics from 16 real images of every class, then frozen
            self.net.train()
            with torch.no_grad():
                self.net(torch.cat([self.ctx.real_batch(c, BN_IMAGES_PER_CLASS, generator) for c in classes]))
            for m in bns:
                m.eval()
        real = [self.ctx.real_batch(c, self.opts.batch_real, generator) for c in classes]
        loss = gradient_matching_loss(self.net, classes, real, syn, self.dsa, generator, self.passes)
        return {"loss": loss, "gm": loss.detach()}
