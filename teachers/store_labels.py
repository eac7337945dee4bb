"""The `store` label source: a student replays an FKD region-level soft-label store.

`distill labels` (distill.generate_store) writes the store from the recipe's pool, `generate`
describing what it writes; `distill train` with the same recipe replays its crops and labels with
no teacher built (`teachers.store.StoredLabeler`); each loaded image yields `crops_per_image` views
per step (multi-crop loading; trainer.batch_size counts images). A store of E label epochs serves
any number of student epochs: epoch e replays label epoch e mod E (`CyclicStoredLabeler`; the FKD
reference reuses its crop bank so), so `generate.epochs` sets what the teachers cost, once.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from distill.config import RunConfig, Strict
from distill.errors import ArtefactError, ConfigError
from distill.imagefiles import ImageFiles
from teachers.labeling import LabelContext, Labeling, register_labeler
from teachers.store import DECODE_MODES
from teachers.store_replay import LabelStore, StoredLabeler


class CalibrationConfig(Strict):
    """FerKD region calibration (`teachers.calibrate.RegionCalibrator`), applied while a store is
    generated, ranking each image's whole crop bank of one epoch. Thresholds are midrank
    percentiles within the image (per_image) or GT probabilities (absolute). Defaults: drop 5% at
    each end, calibrate the next 15% with ε = 0.1 label smoothing (docs/fkd_ferkd.md says why)."""

    t_low: float = Field(0.05, ge=0, le=1)
    t_mid: float = Field(0.2, ge=0, le=1)
    t_top: float = Field(0.95, ge=0, le=1)
    epsilon: float = Field(0.1, ge=0, lt=1)
    score: Literal["gt_prob", "max_prob"] = "gt_prob"
    ranking: Literal["per_image", "absolute"] = "per_image"

    @model_validator(mode="after")
    def _order(self) -> "CalibrationConfig":
        if not self.t_low <= self.t_mid <= self.t_top:
            raise ValueError(f"need t_low <= t_mid <= t_top, got {self.t_low}, {self.t_mid}, {self.t_top}")
        return self


class SelfMixConfig(Strict):
    """FerKD SelfMix: each crop mixed with another crop of the same image; λ ~ Beta(alpha, alpha)."""

    mode: Literal["cutmix", "mixup"] = "cutmix"
    alpha: float = Field(1.0, gt=0)


class GenerateConfig(Strict):
    """What `distill labels` writes: the pool's soft label on `crops_per_image` RandomResizedCrops
    (data.augment's scale/ratio/flip) per image per epoch, kept as top-k fp16 + class ids."""

    epochs: int | None = Field(None, ge=1)  # None: trainer.epochs
    crops_per_image: int = Field(8, ge=1, le=32767)  # M, the crop bank per image-epoch
    topk: int | Literal["full"] = 5  # "full": all classes, dense fp16
    calibrate: CalibrationConfig | None = None  # FerKD; None: the pool's label as is (FKD)
    selfmix: SelfMixConfig | None = None
    shard_images: int = Field(1024, ge=1)  # images per shard (one shard = one epoch × this many)
    batch_size: int = Field(256, ge=1)  # crops per teacher forward

    @field_validator("topk")
    @classmethod
    def _topk(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"topk must be >= 1 or 'full', got {v}")
        return v

    @model_validator(mode="after")
    def _mix(self) -> "GenerateConfig":
        if self.selfmix is not None and self.crops_per_image < 2:
            raise ValueError("selfmix mixes crops of the same image: needs crops_per_image >= 2")
        return self


class StoreOptions(Strict):
    """`labels: {source: store, store: PATH, ...}` (or, as older recipes write it, `{store: PATH}`)."""

    store: Path
    crops_per_image: int | None = Field(None, ge=1)  # views per loaded image; None: all stored
    decode: Literal[DECODE_MODES] = "marginal_smoothing"
    generate: GenerateConfig | None = None  # None: defaults when generating; no recipe check on replay


def generate_section(opts: StoreOptions) -> GenerateConfig:
    return opts.generate if opts.generate is not None else GenerateConfig()


def generation_hash(cfg: RunConfig, opts: StoreOptions) -> str:
    """What decides a store's content: data (with its crop parameters), teachers, temperature and
    the generate section. Not the seed or epoch count (both are in the store's spec), so students
    of any seed and any epoch count up to the store's can check that a store fits their recipe."""
    gen = generate_section(opts).model_dump(mode="json", exclude_defaults=True)
    gen.pop("epochs", None)
    ident = {"data": cfg.data.model_dump(mode="json", exclude_defaults=True),
             "pool": cfg.pool.model_dump(mode="json", exclude_defaults=True) if cfg.pool else None,
             "temperature": cfg.loss.temperature, "generate": gen}  # defaults left out: new fields keep old hashes
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


@register_labeler("store")
class StoreLabels(Labeling):
    Options = StoreOptions

    def check(self, run: RunConfig) -> None:
        if run.data.crops_per_image > 1:
            raise ValueError("data.crops_per_image is for fresh crops; a store replays its own: set "
                             "labels.crops_per_image (views per loaded image) and leave data.crops_per_image at 1")
        if run.loss.discriminator != "none":
            raise ValueError("loss.discriminator needs teacher logits; a label store (labels.store) holds "
                             "probabilities only: set loss.discriminator: none")

    def build(self, ctx: LabelContext) -> StoredLabeler:
        """The replaying labeler, after checking the store fits the recipe and the data."""
        cfg, opts = ctx.run, self.options
        store = LabelStore(opts.store)
        store.check_data(ctx.train)
        store.check_files()
        if opts.generate is not None and generation_hash(cfg, opts) != store.spec.config_hash:
            raise ArtefactError(f"{store.root}: generated from another recipe (data, teachers or labels.generate "
                                f"differ: hash {store.spec.config_hash}, this recipe {generation_hash(cfg, opts)}); "
                                f"rerun `distill labels` to a new labels.store")
        try:
            return CyclicStoredLabeler(store, opts.crops_per_image, opts.decode,
                                       precut=isinstance(ctx.train, ImageFiles))
        except ValueError as err:
            raise ConfigError(str(err)) from None

    def describe(self, run: RunConfig) -> str:
        return f"label store {self.options.store}"

    def summary(self, labeler: StoredLabeler) -> dict:
        return {"label_epochs": labeler.store.spec.epochs}

    def report(self, summary: dict) -> list[str]:
        return [f"- label store of {summary['label_epochs']} label epoch(s): student epoch e replays label epoch "
                f"e mod {summary['label_epochs']}", ""]


class CyclicStoredLabeler(StoredLabeler):
    """Replays a store of E label epochs for any number of student epochs: epoch e reads label
    epoch e mod E. `keep_all` holds every label epoch in memory once read (small stores, many
    cycles: synth relabel); otherwise one epoch at a time (ImageNet-sized stores)."""

    def __init__(self, store: LabelStore, crops_per_image: int | None = None, decode: str = "marginal_smoothing",
                 keep_all: bool = False, precut: bool = False):
        super().__init__(store, crops_per_image, decode, precut)
        self.keep_all, self._cache = keep_all, {}

    def rows(self, epoch: int) -> dict:
        e = epoch % self.store.spec.epochs
        if not self.keep_all:
            return super().rows(e)
        if e not in self._cache:
            self._cache[e] = self.store.load_epoch(e)
        return self._cache[e]
