"""The one idea everything rests on: a label source serves soft labels for a batch of images.

Teachers, ensembles, calibrators, active query sources and projectors implement
`LabelSource.soft_labels(images, targets, index) -> SoftLabels`. A trainer sees one level up: a
`BatchLabeler` turns a loaded batch into the views it trains on and their labels (`Batch`), so a
label store can replay recorded crops where an online source cuts fresh ones. Students import
this contract and nothing else from `teachers/`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch


@dataclass
class SoftLabels:
    """Probabilities `[B, C]` plus optional detail: raw logits (for losses that need them, e.g. the
    MEAL V2 discriminator), per-teacher probabilities, and a per-row mask of usable rows."""

    probs: torch.Tensor
    logits: torch.Tensor | None = None
    per_teacher: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None


@dataclass
class QueryCost:
    """What serving labels cost: images sent to each teacher and seconds spent in it."""

    queries: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, images: int, seconds: float) -> None:
        self.queries[name] = self.queries.get(name, 0) + images
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @property
    def total_queries(self) -> int:
        return sum(self.queries.values())

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


@runtime_checkable
class LabelSource(Protocol):
    num_classes: int
    cost: QueryCost

    def soft_labels(
        self, images: torch.Tensor, targets: torch.Tensor | None = None, index: torch.Tensor | None = None
    ) -> SoftLabels:
        """`images` are float in [0, 1], `[B, C, H, W]`, at the data's size; each source adapts them
        to its own models' preprocessing. `targets`/`index` are for sources that need them."""
        ...


@dataclass
class Batch:
    """What a training step consumes: the views, their targets and their soft labels (None: hard)."""

    images: torch.Tensor  # float [B, C, H, W] in [0, 1]: the views the student trains on
    targets: torch.Tensor
    soft: SoftLabels | None


class BatchLabeler(Protocol):
    """Turns a loaded batch into training views and their labels. Online sources crop fresh and
    ask teachers; a label store replays recorded crops with recorded labels."""

    cost: QueryCost

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, index: torch.Tensor, epoch: int,
                 generator: torch.Generator) -> Batch: ...


Views = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # a batch in [0, 1] → its training views


def as_loaded(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Views that keep a batch as loaded: image files arrive already cut (distill.imagefiles), or
    a protocol asks for no augmentation."""
    return images


class OnlineLabeler:
    """Fresh views (`views`: random crops, DSA, ...); soft labels from `source` on exactly those
    views, or none (hard labels)."""

    def __init__(self, views: Views, source: LabelSource | None):
        self.views, self.source = views, source
        self.cost = source.cost if source is not None else QueryCost()

    def __call__(self, images, targets, index, epoch, generator) -> Batch:
        views = self.views(images, generator)
        soft = self.source.soft_labels(views, targets, index) if self.source is not None else None
        return Batch(views, targets, soft)
