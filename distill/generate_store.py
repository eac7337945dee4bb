"""`distill labels RECIPE`: pay for the teachers once and write a region-level soft-label store.

The label source is the recipe's pool (one teacher, or the MEAL V2 ensemble), wrapped in FerKD's
`RegionCalibrator` when `labels.generate.calibrate` is set, which then ranks each image's whole
crop bank of an epoch at once. `distill train` with the same recipe replays the store and builds
no teacher (the `store` label source, `teachers.store_labels`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.artefacts import ensure_writable
from distill.config import RunConfig
from distill.data import ImageSet, load_data
from distill.distributed import rank_world, resolve_device
from distill.errors import ConfigError
from distill.progress import set_interval
from distill.teacher_pool import build_pool, check_checkpoints
from teachers.calibrate import RegionCalibrator
from teachers.labeling import labeling_for
from teachers.store import RowBatched, StoreSpec, generate_store
from teachers.store_labels import StoreOptions, generate_section, generation_hash


@dataclass
class LabelsResult:
    root: Path
    manifest: dict[str, Any] | None  # None: this rank is done, other ranks' shards are missing
    rank: int
    world: int
    seconds: float
    teacher_queries: int
    teacher_seconds: float

    def summary(self) -> str:
        if self.manifest is None:
            return (f"{self.root}: rank {self.rank}/{self.world} wrote its shards in {self.seconds:.1f}s; the manifest "
                    f"is merged when the last rank finishes")
        m = self.manifest
        crops = m["num_images"] * m["epochs"] * m["crops_per_image"]
        k = "full" if m["topk"] == len(m["class_names"]) else m["topk"]
        lines = [f"{self.root}: {m['label_source']} on {m['epochs']} epochs × {m['num_images']} images × "
                 f"{m['crops_per_image']} crops = {crops} labelled crops, top-{k} fp16",
                 f"  {len(m['shards'])} shards, {m['bytes']:,} bytes: {m['bytes_per_crop']:.1f} B/crop, "
                 f"{m['bytes_per_image_epoch']:.1f} B/image-epoch",
                 f"  this run: {self.seconds:.1f}s, {self.teacher_queries} teacher queries ({self.teacher_seconds:.1f}s in teachers)"]
        if "band_fractions" in m:
            lines.append("  FerKD bands: " + ", ".join(f"{k} {v:.1%}" for k, v in m["band_fractions"].items()))
        return "\n".join(lines)


def build_label_source(cfg: RunConfig, opts: StoreOptions, train: ImageSet, device: torch.device):
    """(source, calibrator or None, description): the pool, asked `batch_size` crops at a time,
    inside a RegionCalibrator when FerKD calibration is on."""
    gen = generate_section(opts)
    names = [t.display_name for t in cfg.pool.teachers]
    desc = f"teacher {names[0]}" if len(names) == 1 else f"MEAL V2 ensemble of {', '.join(names)}"
    source = RowBatched(build_pool(cfg, train, device), gen.batch_size)
    if gen.calibrate is None:
        return source, None, desc
    c = gen.calibrate
    calibrator = RegionCalibrator(source, c.t_low, c.t_mid, c.t_top, c.epsilon, c.score, c.ranking, gen.crops_per_image)
    return calibrator, calibrator, desc + " + FerKD calibration"


def store_spec(cfg: RunConfig, opts: StoreOptions, train: ImageSet, desc: str) -> StoreSpec:
    gen, aug = generate_section(opts), cfg.data.augment
    topk = train.num_classes if gen.topk == "full" else gen.topk
    if topk > train.num_classes:
        raise ConfigError(f"labels.generate.topk: {topk} but the data has {train.num_classes} classes; "
                          f"use 1..{train.num_classes} or 'full'")
    return StoreSpec(
        config_hash=generation_hash(cfg, opts), label_source=desc, teachers=tuple(t.display_name for t in cfg.pool.teachers),
        class_names=tuple(train.class_names), data_fingerprint=train.fingerprint(), image_size=train.image_size,
        num_images=len(train), epochs=gen.epochs or cfg.trainer.epochs, crops_per_image=gen.crops_per_image,
        topk=topk, shard_images=gen.shard_images, seed=cfg.seed, scale=tuple(aug.scale), ratio=tuple(aug.ratio),
        flip_prob=0.5 if aug.flip else 0.0, selfmix_mode=gen.selfmix.mode if gen.selfmix else None,
        selfmix_alpha=gen.selfmix.alpha if gen.selfmix else 1.0,
        calibration=gen.calibrate.model_dump(mode="json") if gen.calibrate else None)


def generate_labels(cfg: RunConfig, rank: int | None = None, world: int | None = None,
                    data: tuple[ImageSet, ImageSet] | None = None, progress: bool = True) -> LabelsResult:
    """Write (or resume) this rank's shards of `labels.store`; merge the manifest when complete."""
    opts = labeling_for(cfg).options
    if not isinstance(opts, StoreOptions):
        raise ConfigError("distill labels needs labels.store in the recipe (where to write the store)")
    if cfg.pool is None:
        raise ConfigError("distill labels needs a label source: set pool.teachers (one teacher or several)")
    rank, world = rank_world(rank, world)
    set_interval(cfg.log.every_seconds)
    device = resolve_device(cfg.device)
    train, _ = data or load_data(cfg.data)
    check_checkpoints(cfg, train.num_classes)
    ensure_writable(opts.store, "labels.store")
    source, calibrator, desc = build_label_source(cfg, opts, train, device)
    spec = store_spec(cfg, opts, train, desc)
    start = time.perf_counter()
    manifest = generate_store(opts.store, spec, train, source, device, generate_section(opts).batch_size,
                              rank, world, progress, calibrator, cfg.trainer.num_workers)
    return LabelsResult(Path(opts.store), manifest, rank, world, time.perf_counter() - start,
                        source.cost.total_queries, source.cost.total_seconds)
