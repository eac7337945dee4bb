"""The `label_smoothing` label source: hard labels softened, `(1 − ε)·onehot + ε/C` (Szegedy et al.,
2016; timm's `--smoothing`, `torch.nn.CrossEntropyLoss(label_smoothing=ε)`), on fresh views.

The teacher-free baseline a KD result should beat: it softens targets as a teacher does, but with
no information about which wrong classes are plausible. `labels: {source: label_smoothing, epsilon: 0.1}`.
"""
from __future__ import annotations

import torch.nn.functional as F
from pydantic import Field

from distill.config import RunConfig, Strict
from teachers.labeling import LabelContext, Labeling, register_labeler
from teachers.source import Batch, QueryCost, SoftLabels, Views


class SmoothingOptions(Strict):
    epsilon: float = Field(0.1, ge=0, lt=1)  # mass spread uniformly over all C classes (0: one-hot)


class SmoothedLabeler:
    """Fresh views with smoothed one-hot labels; asks no teacher."""

    def __init__(self, views: Views, num_classes: int, epsilon: float):
        self.views, self.num_classes, self.epsilon = views, num_classes, epsilon
        self.cost = QueryCost()

    def __call__(self, images, targets, index, epoch, generator) -> Batch:
        onehot = F.one_hot(targets, self.num_classes).float()
        probs = onehot * (1 - self.epsilon) + self.epsilon / self.num_classes
        return Batch(self.views(images, generator), targets, SoftLabels(probs=probs))


@register_labeler("label_smoothing")
class LabelSmoothing(Labeling):
    Options = SmoothingOptions

    def check(self, run: RunConfig) -> None:
        if run.loss.discriminator != "none":
            raise ValueError("labels.source label_smoothing has no teacher logits for loss.discriminator: set it to none")

    def build(self, ctx: LabelContext) -> SmoothedLabeler:
        return SmoothedLabeler(ctx.views, ctx.train.num_classes, self.options.epsilon)

    def describe(self, run: RunConfig) -> str:
        return f"hard labels smoothed (ε = {self.options.epsilon})"
