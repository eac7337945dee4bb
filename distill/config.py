"""Recipes: YAML → typed, frozen config objects, validated before any compute.

A recipe is data (registry names + arguments, `yaml.safe_load`, no Python tags). Unknown keys, wrong
types and unknown model names fail at load with the field path, the bad value and what is allowed.
This module is the bottom layer: it parses structure only. Names registered by the upper packages
(label sources, KD losses, weightings, strategies) are checked by `distill.recipe`, the entry point
that has imported them all; checks that need the data or checkpoint headers (class counts) run in
each job before any training step.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, Tag,
                      ValidationError, field_validator, model_serializer, model_validator)

from distill.artefacts import ADAPTER_CONFIG, ADAPTER_META, LABELS_DIR, PROJECTOR_FILE, find_projector
from distill.deepspeed_config import adopt_sections, check_deepspeed_config, read_deepspeed_config
from distill.errors import ArtefactError, ConfigError
from distill.models import is_known_model, suggest_models


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_scale(v: tuple[float, float]) -> tuple[float, float]:
    if not 0 < v[0] <= v[1] <= 1:
        raise ValueError(f"need 0 < min <= max <= 1, got {v}")
    return v


# RandomResizedCrop area fraction (min, max); every crop config uses this one type
CropScale = Annotated[tuple[float, float], AfterValidator(_check_scale)]


def _existing_file(v: Path) -> Path:
    if not v.is_file():
        raise ValueError(f"checkpoint file {str(v)!r} does not exist")
    return v


CheckpointFile = Annotated[Path, AfterValidator(_existing_file)]  # a local weights file that must exist


def _check_device(v: str) -> str:
    if v not in ("auto", "cpu", "cuda", "mps") and not v.startswith("cuda:"):
        raise ValueError(f"device {v!r}; allowed: auto, cpu, cuda, cuda:N, mps")
    return v


Device = Annotated[str, AfterValidator(_check_device)]  # auto | cpu | cuda | cuda:N | mps


class AugmentConfig(Strict):
    """Training-time RandomResizedCrop (+ optional horizontal flip), applied per batch as boxes so a
    label store can record and replay them exactly."""

    scale: CropScale = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False  # off by default: digits are not mirror-symmetric


class SubsetConfig(Strict):
    """`data.train_subset`: a seeded, class-balanced subset of the training images."""

    per_class: int = Field(ge=1)  # images per class (all of a class that has fewer)
    seed: int = 0


class LoaderConfig(Strict):
    """How training batches reach the device. One DataLoader serves the whole run (workers persist
    across epochs); the epoch's order and crops stay a function of (seed, epoch), so resume is exact."""

    pin_memory: bool | Literal["auto"] = "auto"  # auto: on when training on a GPU
    persistent_workers: bool = True  # with trainer.num_workers > 0: keep the workers between epochs
    prefetch_factor: int = Field(2, ge=1)  # batches each worker loads ahead (num_workers > 0)
    # the student's weights and input batches in channels_last memory format; under DeepSpeed the
    # batches only (DeepSpeed keeps weights in flat contiguous buffers; a convolution given a
    # channels_last batch still runs, and hands on, channels_last). docs/performance.md
    channels_last: bool = False


DATA_SOURCES = ("digits", "npz", "imagefolder", "webdataset")  # distill.data.DATA_SOURCES registers each


class DataConfig(Strict):
    """Where images come from (`source`, a name in `distill.data.DATA_SOURCES`) and how they are
    served. In-memory sources (digits, npz) are resized to `image_size` at load and cropped per
    batch; image files (imagefolder, webdataset) are decoded in loader workers and cropped on the
    whole photo (docs/data.md)."""

    source: Literal[DATA_SOURCES] = "digits"
    path: Path | None = None  # .npz file, or an ImageFolder root holding train/ and val/ (or test/)
    urls: str | None = None  # webdataset: training shards, e.g. /data/in1k/train-{000000..000146}.tar
    val_urls: str | None = None  # webdataset: test shards; None: the pack manifest's val split
    image_size: int = Field(32, ge=8, le=1024)  # the square the student sees (crops and eval images)
    channels: Literal[1, 3] | None = None  # None: the data's own (digits/MNIST 1, ImageFolder 3)
    train_limit: int | None = Field(None, ge=1)  # N training images (quick runs; docs/data.md: which)
    train_subset: SubsetConfig | None = None  # a seeded per-class subset (every source)
    # image files: M crops cut from one decode (FKD's multi-crop), each a training view; a label
    # store's replay uses labels.crops_per_image instead
    crops_per_image: int = Field(1, ge=1, le=64)
    augment: AugmentConfig = AugmentConfig()
    loader: LoaderConfig = LoaderConfig()
    # an ImageFolder file that cannot be decoded: `error` names it and stops; `skip` leaves it out of
    # its batch and counts it (metrics, report); a preflight decode of every file is too slow at scale
    on_bad_image: Literal["error", "skip"] = "error"

    @model_validator(mode="after")
    def _path(self) -> "DataConfig":
        if self.source == "digits":
            if self.path is not None:
                raise ValueError("source 'digits' is built in and takes no path")
        elif self.source == "webdataset":
            if self.urls is None or self.path is not None:
                raise ValueError("source 'webdataset' reads data.urls (shards, e.g. DIR/train-{000000..000146}.tar "
                                 "written by `distill data pack`) and takes no data.path")
        elif self.path is None:
            raise ValueError(f"source {self.source!r} needs data.path")
        elif not self.path.exists():
            raise ValueError(f"data.path {str(self.path)!r} does not exist")
        if self.source != "webdataset" and (self.urls or self.val_urls):
            raise ValueError(f"data.urls/val_urls are for source 'webdataset' (source is {self.source!r})")
        if self.crops_per_image > 1 and self.source in ("digits", "npz"):
            raise ValueError(f"data.crops_per_image cuts several views from one decoded image file (sources imagefolder, "
                             f"webdataset); source {self.source!r} is in memory and cropped per batch: leave it at 1")
        if self.train_limit and self.train_subset:
            raise ValueError("set data.train_limit (N images) or data.train_subset (per class), not both")
        return self


class EvalPreprocessConfig(Strict):
    """`eval:`, how image files become test images: resize the short side to `resize` (default
    image_size / crop_pct), centre-crop `image_size`. Unset keys come from the student's timm
    `pretrained_cfg` (else the first teacher's; else crop_pct 1, bilinear), so top-1 is comparable
    with timm's. In-memory data (digits, npz) is already at image_size and is used as is."""

    resize: int | None = Field(None, ge=8)
    crop_pct: float | None = Field(None, gt=0, le=1)
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None

    @model_validator(mode="after")
    def _one(self) -> "EvalPreprocessConfig":
        if self.resize is not None and self.crop_pct is not None:
            raise ValueError("set eval.resize (short side in pixels) or eval.crop_pct (image_size / short side), not both")
        return self


class ModelConfig(Strict):
    """A classifier: a timm name (or an engine-registered architecture) and optional local weights
    (safetensors written by this engine or a user's; `.pt/.pth` read with `weights_only=True`)."""

    model: str
    checkpoint: CheckpointFile | None = None  # ours (with metadata) or a user's timm weights (timm's loader)
    pretrained: bool = False  # timm's hub weights for `model` (needs the network; a local checkpoint is the offline way)
    name: str | None = None  # display name; default: the model name
    input_size: int | None = None  # None: the data's image size
    mean: tuple[float, ...] | None = None  # None: from the checkpoint's metadata, else 0.5
    std: tuple[float, ...] | None = None
    drop_rate: float = Field(0.0, ge=0.0, lt=1.0)

    @field_validator("model")
    @classmethod
    def _known(cls, v: str) -> str:
        if not is_known_model(v):
            raise ValueError(f"unknown model {v!r}; allowed: any timm model name or {suggest_models(v)}")
        return v

    @model_validator(mode="after")
    def _one_weights_source(self) -> "ModelConfig":
        if self.pretrained and self.checkpoint is not None:
            raise ValueError("set checkpoint (a local file) or pretrained: true (timm's hub weights), not both")
        return self

    @property
    def display_name(self) -> str:
        return self.name or self.model


class ProjectorTeacherConfig(Strict):
    """A HeLlO label projector (`distill synth`, labels.mode: projector) as a pool teacher
    (`synth.hello.projector_teacher`). `projector`: the distilled-dataset directory, its `labels/`
    directory or the `projector.safetensors` file, resolved to the file. `checkpoint`: the base
    encoder on this machine, replacing the path stored in the projector (its checksum must match)."""

    projector: Path
    checkpoint: CheckpointFile | None = None
    name: str | None = None  # display name; default: projector_<artefact directory name>

    @field_validator("projector")
    @classmethod
    def _resolve(cls, v: Path) -> Path:
        found = find_projector(v)
        if found is None or (found.is_file() and found.name != PROJECTOR_FILE):
            raise ValueError(f"projector {str(v)!r} does not exist: give a distilled-dataset directory (holding "
                             f"{LABELS_DIR}/{PROJECTOR_FILE}), its {LABELS_DIR}/ directory, the {PROJECTOR_FILE} "
                             f"file itself, or a peft adapter directory exported from one ({ADAPTER_CONFIG} + "
                             f"{ADAPTER_META})")
        return found

    @property
    def display_name(self) -> str:
        if self.projector.is_dir():  # a peft adapter directory
            return self.name or f"projector_{self.projector.name}"
        art = self.projector.parent.parent if self.projector.parent.name == LABELS_DIR else self.projector.parent
        return self.name or f"projector_{art.name}"


def _teacher_kind(v: Any) -> str | None:
    if isinstance(v, dict):
        return "ProjectorTeacherConfig" if "projector" in v else "ModelConfig" if "model" in v else None
    return type(v).__name__ if isinstance(v, (ModelConfig, ProjectorTeacherConfig)) else None


def _check_teacher_keys(v: Any) -> Any:
    """Say which keys make a teacher, rather than pydantic's errors for every union member."""
    if isinstance(v, dict) and _teacher_kind(v) is None:
        raise ValueError(f"a teacher is a classifier (keys: {', '.join(ModelConfig.model_fields)}) or a HeLlO "
                         f"projector (keys: {', '.join(ProjectorTeacherConfig.model_fields)}); got keys {sorted(v)}")
    return v


# a pool teacher: `model:` → ModelConfig, `projector:` → ProjectorTeacherConfig (the tags are the
# class names, which format_validation_error drops from error paths)
TeacherConfig = Annotated[
    Union[Annotated[ModelConfig, Tag("ModelConfig")], Annotated[ProjectorTeacherConfig, Tag("ProjectorTeacherConfig")]],
    Discriminator(_teacher_kind, custom_error_type="teacher_kind",
                  custom_error_message="a teacher is a mapping with `model:` (a classifier) or `projector:` (a HeLlO projector)"),
    BeforeValidator(_check_teacher_keys)]
_UNION_TAGS = ("ModelConfig", "ProjectorTeacherConfig")


class PoolConfig(Strict):
    """The teacher pool. MEAL V2: the soft label is the mean of the teachers' softmax. A teacher is
    a classifier (`model:`) or a HeLlO label projector (`projector:`, ProjectorTeacherConfig).

    `weighting` (teachers/pool.py): `uniform` (MEAL V2), `fixed` (`weights`), `distill_weighted`
    (one weight per teacher, softmax(score / `temperature`) of a kNN/linear probe on its features
    over `labelled` target images), `confidence` (per sample). Teachers trained for another label
    space (engine checkpoints say so) are read through a target head fitted on those images.
    """

    teachers: list[TeacherConfig] = Field(min_length=1)
    weights: list[float] | None = None  # fixed per-teacher weights (normalised); None: uniform
    weighting: str = "uniform"  # a name in teachers.weighting.POOL_WEIGHTINGS, checked at recipe load
    # DistillWeighted τ on scores in [0, 1] (accuracies): 0.1 turns a 0.1 score gap into a weight
    # ratio e ≈ 2.7; τ → 0 is DistillNearest, large τ uniform
    temperature: float = Field(0.1, gt=0)
    score: Literal["knn", "linear"] = "knn"  # the cheap classifier behind the task-similarity score
    score_k: int = Field(5, ge=1)  # kNN neighbours, or linear-probe folds
    labelled: int = Field(0, ge=0)  # labelled target images (a seeded subset of the training set)
    heads: Literal["foreign", "all"] = "foreign"  # which teachers are read through a fitted target head
    # how teachers run: autocast at `precision` (None: the run's), channels_last memory format
    precision: Literal["fp32", "bf16", "fp16"] | None = None
    channels_last: bool = True
    confidence_targets: bool = False  # confidence weighting: use the batch's true labels where given

    @model_validator(mode="before")
    @classmethod
    def _fixed_by_default(cls, raw: Any) -> Any:
        """A recipe that lists `weights` without `weighting` keeps its old meaning: fixed weights."""
        if isinstance(raw, dict) and raw.get("weights") is not None and "weighting" not in raw:
            return {**raw, "weighting": "fixed"}
        return raw

    @model_validator(mode="after")
    def _weights(self) -> "PoolConfig":
        if (self.weighting == "fixed") != (self.weights is not None):
            raise ValueError(f"weights are set exactly when weighting is 'fixed' (weighting {self.weighting!r}, "
                             f"weights {self.weights})")
        if self.weighting == "distill_weighted" and self.labelled < 2:
            raise ValueError(f"weighting 'distill_weighted' scores teachers on labelled target images: set "
                             f"pool.labelled >= 2 (got {self.labelled})")
        if self.labelled == 1:
            raise ValueError("pool.labelled is 0 (none) or >= 2: one image cannot score teachers or fit a head")
        if self.heads == "all" and self.labelled < 2:
            raise ValueError(f"heads 'all' fits a target head per teacher: set pool.labelled >= 2 (got {self.labelled})")
        if self.weights is not None:
            if len(self.weights) != len(self.teachers):
                raise ValueError(f"weights has {len(self.weights)} entries for {len(self.teachers)} teachers")
            if min(self.weights) < 0 or sum(self.weights) <= 0:
                raise ValueError(f"weights must be >= 0 with a positive sum, got {self.weights}")
        projectors = [t.display_name for t in self.teachers if isinstance(t, ProjectorTeacherConfig)]
        if projectors and self.weighting == "distill_weighted":
            raise ValueError(f"weighting 'distill_weighted' is not supported with projector teachers {projectors}: a "
                             f"projector is already fitted to the data's label space, and its features are a frozen "
                             f"encoder's, not a classifier backbone's for the probe to score; use uniform, fixed or "
                             f"confidence")
        if projectors and self.heads == "all":
            raise ValueError(f"heads 'all' is not supported with projector teachers {projectors}: a projector already "
                             f"serves the data's classes (no target head to fit); use heads: foreign")
        names = [t.display_name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique (set `name:`), got {names}")
        return self


def check_kd_temperature(kd: str, temperature: float, kd_key: str, t_key: str) -> None:
    """`soft_ce` is MEAL V2's and FKD's loss at T = 1. The label source softens the teacher at T but
    `soft_ce` leaves the student at T = 1, so another T would train against a one-sided target that
    no method publishes: refused (docs/losses.md); `kl` is Hinton KD at T, softening both."""
    if kd == "soft_ce" and temperature != 1.0:
        raise ValueError(f"{kd_key} soft_ce takes {t_key} 1, got {temperature}: set {t_key}: 1, or {kd_key}: kl "
                         f"for Hinton KD at temperature T (T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)))")


class LossConfig(Strict):
    """Student loss. With a pool: `kd` on the pool's soft labels (+ optional `hard_ce` weight, + the
    MEAL V2 discriminator). Without a pool: plain cross-entropy on hard labels."""

    kd: str = "soft_ce"  # a name in students.losses.KD_LOSSES (soft_ce | kl), checked at recipe load
    temperature: float = Field(1.0, gt=0)  # the teachers' softmax temperature; soft_ce: 1 only
    hard_ce: float = Field(0.0, ge=0)  # MEAL V2 uses none
    discriminator: Literal["none", "joint", "adversarial"] = "none"
    # `follow_student`: the discriminator's parameter group has the student's lr and schedule, as
    # MEAL V2's train.py runs it (its per-epoch lr setter overwrites every group, the --d_lr 1e-4
    # group included); a number: a base lr of its own, which the same schedule scales (docs/losses.md)
    discriminator_lr: Literal["follow_student"] | Annotated[float, Field(gt=0)] = "follow_student"
    discriminator_weight: float = Field(1.0, ge=0)
    # MEAL V2's code puts a ReLU after the discriminator's last layer too; its two outputs can then
    # die (loss stuck at ln 2, no gradient). True = the reference; False = linear last layer.
    discriminator_final_relu: bool = True

    @model_validator(mode="after")
    def _temperature(self) -> "LossConfig":
        check_kd_temperature(self.kd, self.temperature, "loss.kd", "loss.temperature")
        return self


class OptimConfig(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["constant", "step", "cosine"] = "cosine"
    milestones: list[int] = []  # epochs at which `step` multiplies lr by gamma
    gamma: float = Field(0.1, gt=0, le=1)
    warmup_epochs: int = Field(0, ge=0)
    # per optimiser step, from lr 0 (DeepSpeed's WarmupLR: linear k/N, or log(k+1)/log(N))
    warmup_steps: int = Field(0, ge=0)
    warmup_type: Literal["linear", "log"] = "linear"


class TrainerConfig(Strict):
    """`batch_size` is the global batch: images per optimiser step over all ranks and `grad_accum`
    micro-steps (a rank loads batch_size / (ranks × grad_accum) per micro-step), so one recipe
    trains the same on one process or many. `deepspeed` (backend deepspeed): a DeepSpeed JSON
    config file or an inline mapping; a file is read at load, so the run's config records it."""

    backend: Literal["plain", "deepspeed"] = "plain"
    deepspeed: Path | dict[str, Any] | None = None  # None under deepspeed: ZeRO stage 0 defaults
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)  # micro-steps per optimiser step
    eval_batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    grad_clip: float = Field(0.0, ge=0)  # max global gradient norm per optimiser step; 0: no clipping
    # recipe keys taken from a stock DeepSpeed config's sections → the DeepSpeed key (distill.deepspeed_config)
    from_deepspeed: dict[str, str] = {}
    checkpoint_every: int = Field(1, ge=1)  # epochs
    compile: bool = False  # torch.compile the student and the teachers (in place; first steps compile)
    # a non-finite loss or gradient: `stop` (name the step, keep the last good checkpoint, exit 3) or
    # `skip_step` (drop that optimiser step; at most `max_skipped_steps` per run, then stop)
    on_nonfinite: Literal["stop", "skip_step"] = "stop"
    max_skipped_steps: int = Field(10, ge=1)

    @field_validator("deepspeed")
    @classmethod
    def _read_deepspeed(cls, v: Path | dict | None) -> dict | None:
        return None if v is None else read_deepspeed_config(v)

    @model_validator(mode="after")
    def _backend(self) -> "TrainerConfig":
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of grad_accum {self.grad_accum}")
        if self.deepspeed is not None and self.backend != "deepspeed":
            raise ValueError(f"trainer.deepspeed is set but trainer.backend is {self.backend!r}; "
                             f"set backend: deepspeed, or remove the deepspeed config")
        if self.on_nonfinite == "skip_step" and self.grad_accum > 1:
            raise ValueError("on_nonfinite: skip_step drops whole optimiser steps; it needs trainer.grad_accum: 1")
        return self


class LabelsConfig(Strict):
    """`labels:`, where the student's labels come from: a tagged union on `source`, a name in
    `teachers.labeling.LABELERS` (hard, pool, store, active, label_smoothing, ...); the section's
    other keys are that source's options, which its `Options` model validates when the recipe
    loads (`distill.recipe`). Without a `labels` section: `pool` with a teacher pool, else `hard`.
    Recipes written before `source` existed keep their meaning: `{store: PATH, ...}` is source
    `store`, `{active: {...}}` is source `active` with those options."""

    source: str = Field(pattern=r"^[A-Za-z0-9_]+$")
    options: Any = {}  # a mapping until the recipe loader validates it into the source's Options

    @model_validator(mode="before")
    @classmethod
    def _tag(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        if "source" not in raw:  # the sections of recipes older than the tag
            if ("store" in raw) == ("active" in raw):
                raise ValueError("set labels.source (a label source: store, active, pool, hard, label_smoothing, "
                                 "...); or, as older recipes do, exactly one of labels.store (a label store) and "
                                 "labels.active (budgeted queries)")
            if "active" in raw:
                rest = {k: v for k, v in raw.items() if k != "active"}
                if rest:
                    raise ValueError(f"labels.active takes its options inside it; unknown keys beside it: {sorted(rest)}")
                return {"source": "active", "options": raw["active"] or {}}
            raw["source"] = "store"
        source = raw.pop("source")
        return {"source": source, "options": raw}

    @model_serializer(mode="wrap")
    def _flat(self, handler: Any) -> dict[str, Any]:
        """Written back flat, as a recipe writes it: `{source: NAME, option: value, ...}`."""
        d = handler(self)
        return {"source": d["source"], **(d.get("options") or {})}


class LogConfig(Strict):
    """How a run reports while it goes (not what it trains: left out of the config hash)."""

    every_seconds: float = Field(30.0, gt=0)  # a plain progress line this often when not on a terminal
    every_steps: int = Field(10, ge=1)  # a metrics_steps.jsonl row (and TensorBoard scalars) this often
    tensorboard: bool = False  # event files in <run dir>/tensorboard (pip install 'distill[tensorboard]')


class RunConfig(Strict):
    """One student (or teacher) training run: everything it needs, declared."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    device: Device = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    out_dir: Path = Path("runs")
    data: DataConfig = DataConfig()
    student: ModelConfig
    pool: PoolConfig | None = None
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    trainer: TrainerConfig = TrainerConfig()
    labels: LabelsConfig | None = None  # None: the pool's labels online, or hard labels without a pool
    eval: EvalPreprocessConfig = EvalPreprocessConfig()
    log: LogConfig = LogConfig()

    @model_validator(mode="before")
    @classmethod
    def _adopt_deepspeed(cls, raw: Any) -> Any:
        """A stock DeepSpeed config's optimizer/scheduler/precision/clipping sections fill the recipe
        where it is silent (distill.deepspeed_config.adopt_sections)."""
        if not isinstance(raw, dict):
            return raw
        try:
            return adopt_sections(raw)
        except ValueError as err:
            raise ValueError(f"trainer.deepspeed: {err}") from None

    @model_validator(mode="after")
    def _loss_needs_pool(self) -> "RunConfig":
        if self.pool is None and self.loss.discriminator != "none":
            raise ValueError("loss.discriminator needs a teacher pool (pool.teachers)")
        return self

    @model_validator(mode="after")
    def _deepspeed(self) -> "RunConfig":
        """A DeepSpeed config may not contradict the recipe (distill/deepspeed_config.py)."""
        t = self.trainer
        if t.backend != "deepspeed":
            return self
        try:
            check_deepspeed_config(t.deepspeed or {}, batch_size=t.batch_size, grad_accum=t.grad_accum,
                                   precision=self.precision, optimizer=self.optim.name)
        except ValueError as err:
            raise ValueError(f"trainer.deepspeed: {err}") from None
        return self

    @property
    def run_dir(self) -> Path:
        return self.out_dir / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """Identity of what is trained (not where it is written, nor how it reports): checkpoints
        carry it. Keys left at their defaults are left out, so a field added later at its default
        keeps every older recipe's hash."""
        return _digest(self.model_dump(mode="json", exclude_defaults=True, exclude={"out_dir", "log"}))

    def resume_hash(self) -> str:
        """The hash without the keys a resume may change (`RESUMABLE`): a run stopped by a
        non-finite loss resumes after, e.g., `optim.lr=0.01 trainer.grad_clip=1`."""
        d = self.model_dump(mode="json", exclude_defaults=True, exclude={"out_dir", "log"})
        for key in RESUMABLE:
            *parents, leaf = key.split(".")
            node = d
            for p in parents:
                node = node.get(p, {})
            node.pop(leaf, None)
            if parents and not node:
                d.pop(parents[0], None)  # a section left empty is the same as one left at its defaults
        return _digest(d)

    def check_written_by(self, path: Path, meta: dict[str, Any]) -> None:
        """Refuse (ArtefactError, before anything is written) state at `path` that another recipe
        wrote; keys in `RESUMABLE` may differ. Files older than `resume_hash` carry `config_hash` only."""
        ours, theirs = ((self.resume_hash(), meta["resume_hash"]) if "resume_hash" in meta
                        else (self.hash(), meta.get("config_hash")))
        if ours != theirs:
            raise ArtefactError(f"{path}: written by a different recipe (hash {theirs} != {ours}; a resume may change only "
                                f"{', '.join(RESUMABLE)}); use another `name`/`out_dir`, or delete the run directory "
                                f"to start over")


def _digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


# keys a resumed run may change (docs/errors.md): how long, how it loads/reports/clips, and the step size
RESUMABLE = ("trainer.epochs", "trainer.num_workers", "data.loader", "trainer.eval_batch_size", "trainer.checkpoint_every",
             "trainer.grad_clip", "trainer.on_nonfinite", "trainer.max_skipped_steps", "optim.lr", "precision",
             "device")


# ---------------------------------------------------------------- loading, overrides, errors


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`a.b=value` (value parsed as YAML; list items by index, `pool.teachers.0.checkpoint=...`)."""
    raw = json.loads(json.dumps(raw))  # deep copy, never mutate the caller's dict
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, value = item.split("=", 1)
        parts = key.split(".")
        node: Any = raw
        for i, part in enumerate(parts[:-1]):
            nxt = parts[i + 1]
            if isinstance(node, list):
                node = node[_index(node, part, key)]
            else:
                node = node.setdefault(part, [] if nxt.isdigit() else {})
        last = parts[-1]
        if isinstance(node, list):
            node[_index(node, last, key)] = yaml.safe_load(value)
        elif isinstance(node, dict):
            node[last] = yaml.safe_load(value)
        else:
            raise ConfigError(f"override {key!r}: {'.'.join(parts[:-1])} is not a mapping")
    return raw


def _index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key!r}: {part!r} is not an index of a {len(node)}-item list")
    return int(part)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The config model inside an annotation (Optional, list, Annotated, a union: its first model)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def allowed_keys(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """The keys the mapping at `loc` (a pydantic error location) accepts, following `model`'s fields."""
    tags = {"ModelConfig": ModelConfig, "ProjectorTeacherConfig": ProjectorTeacherConfig}
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        if part in tags:
            model = tags[part]
            continue
        field = model.model_fields.get(part)
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def format_validation_error(err: ValidationError, source: str, prefix: str = "",
                            model: type[BaseModel] | None = None) -> str:
    """One line per problem: the field's path (under `prefix`), what is wrong, the bad value; an
    unknown key also gets the keys allowed there and the closest one (`model`: the validated class)."""
    lines = [f"{source}: invalid recipe ({err.error_count()} problem{'s' * (err.error_count() > 1)})"]
    for e in err.errors():
        loc = ".".join([prefix] * bool(prefix) + [str(p) for p in e["loc"] if p not in _UNION_TAGS]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            allowed = allowed_keys(model, e["loc"][:-1])
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1, cutoff=0.6)
            msg = "unknown key" + (f"; did you mean {close[0]!r}?" if close else "") + \
                (f" (allowed here: {', '.join(allowed)})" if allowed else "")
        elif e["type"] == "literal_error":
            msg = f"not allowed; {msg.lower()}"
        got = e.get("input")
        got_s = "" if isinstance(got, dict) or e["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  - {loc}: {msg}{got_s}")
    return "\n".join(lines)


def parse_run_config(raw: dict[str, Any], source: str = "recipe") -> RunConfig:
    """The recipe's structure; `distill.recipe.parse_config` adds the checks that need registries."""
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, model=RunConfig)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of keys, got {type(raw).__name__}")
    return raw


def dump_config(cfg: BaseModel) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
