"""`distill labels RECIPE --estimate`: what a label store will cost, measured here, written nowhere.

The recipe's label source (its pool, calibration, top-k) labels one shard's worth of sample images
(`--estimate-images`, default 64) the way generation will — in-memory images cropped on the device,
image files decoded and cut by the recipe's `trainer.num_workers` loader workers, so decoding is in
the wall time — a first pass warms up, the median of three timed passes counts — and the numbers
scale linearly to the whole store: crops = images × label epochs × crops per image; teacher-seconds
and wall time per crop on this machine (wall time split over `--world` processes); bytes as the
shard the sample makes, serialised.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from safetensors.torch import save as safetensors_save

from distill.config import RunConfig
from distill.data import ImageSet, load_data
from distill.distributed import resolve_device
from distill.errors import ConfigError
from distill.generate_store import build_label_source, store_spec
from distill.imagefiles import ImageFiles
from distill.teacher_pool import check_checkpoints
from teachers.labeling import labeling_for
from teachers.store import label_file_shard, label_shard, shard_generator
from teachers.store_labels import StoreOptions, generate_section

SHARD_OVERHEAD = 320  # bytes a shard adds to its tensors: safetensors header + our JSON metadata (measured)


@dataclass
class LabelEstimate:
    label_source: str
    images: int
    epochs: int
    crops_per_image: int
    sample_images: int
    seconds_per_crop: float  # wall, this machine, one process
    teacher_seconds_per_crop: float
    bytes_per_image_epoch: float  # the tensors alone
    shards: int
    world: int
    device: str

    @property
    def crops(self) -> int:
        return self.images * self.epochs * self.crops_per_image

    @property
    def bytes(self) -> int:
        return round(self.bytes_per_image_epoch * self.images * self.epochs) + SHARD_OVERHEAD * self.shards

    def summary(self) -> str:
        hours = self.seconds_per_crop * self.crops / self.world / 3600
        return "\n".join([
            f"estimate (nothing written): {self.label_source}",
            f"  {self.images} images × {self.epochs} label epochs × {self.crops_per_image} crops = {self.crops:,} crops",
            f"  teachers: {self.teacher_seconds_per_crop * 1e3:.3f} ms/crop → {self.teacher_seconds_per_crop * self.crops / 3600:,.2f} "
            f"teacher-hours on {self.device}",
            f"  wall: {self.seconds_per_crop * 1e3:.3f} ms/crop → {hours:,.2f} h on {self.world} process(es) like this one",
            f"  store: {self.bytes:,} bytes ({self.bytes_per_image_epoch:.1f} B/image-epoch)",
            f"  measured on {self.sample_images} images × {self.crops_per_image} crops (median of 3 passes)"])


def estimate_labels(cfg: RunConfig, sample_images: int = 64, world: int = 1,
                    data: tuple[ImageSet, ImageSet] | None = None) -> LabelEstimate:
    opts = labeling_for(cfg).options
    if not isinstance(opts, StoreOptions) or cfg.pool is None:
        raise ConfigError("distill labels --estimate needs labels.store and pool.teachers in the recipe")
    if sample_images < 1 or world < 1:
        raise ConfigError(f"--estimate-images {sample_images} / --world {world}: both must be >= 1")
    device = resolve_device(cfg.device)
    train, _ = data or load_data(cfg.data)
    check_checkpoints(cfg, train.num_classes)
    source, _, desc = build_label_source(cfg, opts, train, device)
    spec = store_spec(cfg, opts, train, desc)
    n = min(sample_images, len(train))
    per_call = max(1, generate_section(opts).batch_size // spec.crops_per_image)
    files = isinstance(train, ImageFiles)
    if not files:
        images01 = train.images[:n].to(device).float().div_(255)

    def one_pass() -> tuple[float, float, dict]:
        queried = source.cost.total_seconds
        start = time.perf_counter()
        gen = shard_generator(spec.seed, 0, 0)
        if files:  # decode + cut in workers, as generate_store runs them
            tensors = label_file_shard(spec, train, 0, 0, n, source, gen, per_call, device, cfg.trainer.num_workers)
        else:
            tensors = label_shard(spec, images01, train.targets[:n], 0, source, gen, per_call)
        return time.perf_counter() - start, source.cost.total_seconds - queried, tensors

    one_pass()  # warm-up: first calls allocate, compile, fill caches
    passes = [one_pass() for _ in range(3)]
    crops = n * spec.crops_per_image
    body = len(safetensors_save(passes[0][2])) - len(safetensors_save({}))
    return LabelEstimate(desc, len(train), spec.epochs, spec.crops_per_image, n,
                         statistics.median(p[0] for p in passes) / crops, statistics.median(p[1] for p in passes) / crops,
                         body / n, spec.num_chunks * spec.epochs, world, str(device))
