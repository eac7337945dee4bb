"""SRe2L "relabel" through the FKD label store (`teachers.store`): the teachers' soft labels on
`crops_per_image` RandomResizedCrops of every image for each label epoch, top-k fp16 + int16 ids,
sharded and checksummed by the store's own writer, read back by its `LabelStore`/`StoredLabeler`.

The same code labels a distilled set (into the artefact's `labels/`) and the random real subset
that eval-synth trains beside it, so both carry labels of the same kind and size. Students replay
them through the `relabel` label source (`RelabelLabels`): student epoch e reads label epoch e mod E.

The label spec (`RelabelConfig.loss`, `.temperature`) decides both ends: the store keeps the
teachers' softmax at T, and the student learns it with that loss at that T (`student_loss`).
Softening at T before the top-k cut keeps the tail's true mass; softening stored T = 1 labels
afterwards (p^(1/T), renormalised) would be exact only for a `topk: full` store, and inflates a
marginal-smoothing tail (a uniform tail is the largest p^(1/T) can make it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from distill.config import LossConfig, Strict
from distill.data import ImageSet
from distill.errors import ArtefactError, ConfigError
from synth.config import RelabelConfig
from teachers.labeling import LabelContext, Labeling, register_labeler
from teachers.pool import EnsemblePool
from teachers.source import as_loaded
from teachers.store import DECODE_MODES, RowBatched, StoreSpec, generate_store
from teachers.store_labels import CyclicStoredLabeler
from teachers.store_replay import LabelStore


def resolve_topk(rc: RelabelConfig, num_classes: int) -> int:
    if rc.topk == "full":
        return num_classes
    if rc.topk > num_classes:
        raise ConfigError(f"labels.relabel.topk: {rc.topk} but the data has {num_classes} classes; "
                          f"use 1..{num_classes} or 'full'")
    return rc.topk


def relabel_store(root: Path, images: ImageSet, teachers: list, rc: RelabelConfig, seed: int, config_hash: str,
                  device: torch.device, rank: int = 0, world: int = 1, progress: bool = True) -> dict[str, Any] | None:
    """Write (or resume) the label store for `images`; its manifest, or None while other ranks'
    shards are missing. Several teachers: the MEAL V2 mean of their softmax, at the spec's T."""
    names = tuple(t.name for t in teachers)
    desc = f"teacher {names[0]}" if len(names) == 1 else f"MEAL V2 ensemble of {', '.join(names)}"
    desc += f", softmax at T = {rc.temperature:g}" if rc.temperature != 1.0 else ""  # T = 1 stores keep their spec
    source = RowBatched(EnsemblePool(teachers, temperature=rc.temperature).to(device), rc.batch_size)
    spec = StoreSpec(config_hash=config_hash, label_source=desc, teachers=names, class_names=tuple(images.class_names),
                     data_fingerprint=images.fingerprint(), image_size=images.image_size, num_images=len(images),
                     epochs=rc.epochs, crops_per_image=rc.crops_per_image, topk=resolve_topk(rc, images.num_classes),
                     shard_images=rc.shard_images, seed=seed, scale=tuple(rc.scale), ratio=tuple(rc.ratio),
                     flip_prob=0.5 if rc.flip else 0.0)
    return generate_store(root, spec, images, source, device, rc.batch_size, rank, world, progress)


def student_loss(rc: RelabelConfig) -> LossConfig:
    """The loss a student learns a relabel store with: the label spec it was written for."""
    return LossConfig(kd=rc.loss, temperature=rc.temperature)


class RelabelOptions(Strict):
    """A relabel store (`store`: its directory) of the images being trained on."""

    store: Path
    decode: Literal[DECODE_MODES] = "marginal_smoothing"


@register_labeler("relabel")
class RelabelLabels(Labeling):
    """SRe2L relabel: the store's crops and soft labels, replayed cyclically; no teacher."""

    Options = RelabelOptions

    def build(self, ctx: LabelContext) -> CyclicStoredLabeler:
        store = LabelStore(self.options.store)
        try:
            store.check_data(ctx.train)
        except ArtefactError as err:
            raise ArtefactError(f"{err} (the labels do not belong to these images)") from None
        return CyclicStoredLabeler(store, None, self.options.decode, keep_all=True)

    def describe(self, run) -> str:
        return f"relabel store {self.options.store}"


def store_labeler(root: Path, images: ImageSet, decode: str) -> tuple[CyclicStoredLabeler, int]:
    """(the `relabel` labeler replaying the store at `root` for `images`, the store's bytes)."""
    labeler = RelabelLabels(RelabelOptions(store=root, decode=decode)).build(
        LabelContext(images, torch.device("cpu"), views=as_loaded))  # a store replays its own crops
    return labeler, labeler.store.bytes
