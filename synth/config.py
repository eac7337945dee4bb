"""Synthesis recipes (`distill synth RECIPE.yaml`): typed, frozen, validated before any compute.

A recipe names a method from `synth.methods.SYNTH_METHODS` and passes it `options`, which that
method's own `Options` model validates at load, so a new method adds no field here. The `eval`
section is the protocol `distill eval-synth` applies to the artefact (and to the random real
subset and full data beside it); it travels inside the artefact's resolved recipe.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from distill.config import (ConfigError, CropScale, DataConfig, Device, ModelConfig, OptimConfig, Strict,
                            apply_overrides, format_validation_error, read_yaml)
from synth.augment import DSA_OPS
from synth.hello import HelloConfig


class ImageOptim(Strict):
    """The optimiser over synthetic pixels, which live in the data's normalised space
    ((x − mean) / std, as the DC/DM/SRe2L references optimise them)."""

    name: Literal["adam", "sgd"] = "sgd"
    lr: float = Field(1.0, gt=0)
    momentum: float = Field(0.5, ge=0, lt=1)  # sgd (DC/DM: 0.5)
    betas: tuple[float, float] = (0.5, 0.9)  # adam (SRe2L recover: (0.5, 0.9))
    schedule: Literal["constant", "cosine"] = "constant"


class InitConfig(Strict):
    """How synthetic images start. `noise`: N(0, 1) in normalised space (DC/SRe2L); `real`: random
    real images of the class, without replacement; `real_confident`: the real images the teachers
    are most confident on (mean probability of the class), as RDED/HeLlO select their starts."""

    kind: Literal["noise", "real", "real_confident"] = "real"
    candidates: int | None = Field(None, ge=1)  # real_confident: score at most this many per class (None: all)


class RelabelConfig(Strict):
    """SRe2L relabel: the teachers' soft labels on `crops_per_image` RandomResizedCrops of every
    synthetic image for each of `epochs` label epochs, written with the FKD label-store writer
    (`teachers.store`) into the artefact's `labels/`. Students replay them (epoch e uses label
    epoch e mod `epochs`): no teacher at evaluation time."""

    epochs: int = Field(4, ge=1)
    crops_per_image: int = Field(1, ge=1)
    topk: int | Literal["full"] = 5
    scale: CropScale = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False  # random flip of label crops; off by default (digits are not mirror-symmetric)
    decode: Literal["marginal_smoothing", "marginal_renorm", "hard"] = "marginal_smoothing"
    batch_size: int = Field(256, ge=1)  # crops per teacher forward
    shard_images: int = Field(1024, ge=1)  # images per store shard


class LabelConfig(Strict):
    """`projector` (HeLlO, `synth.hello`): a LoRA label projector fitted to the teachers replaces the
    stored labels; `relabel` then describes the crops it is fitted and served on, and the store it
    replaces (for the manifest's bytes ratio)."""

    mode: Literal["hard", "relabel", "projector"] = "hard"
    relabel: RelabelConfig = RelabelConfig()
    projector: HelloConfig | None = None

    @model_validator(mode="after")
    def _projector(self) -> "LabelConfig":
        if self.mode == "projector" and self.projector is None:
            raise ValueError("mode 'projector' needs labels.projector (at least `model:`, the base encoder)")
        return self


class ChunkConfig(Strict):
    """The unit of work, of resume and of rank sharding: `classes` classes × `ipc` images per
    class (None: all). Images of one chunk are optimised together (one batch)."""

    classes: int | None = Field(None, ge=1)
    ipc: int | None = Field(None, ge=1)


class EvalConfig(Strict):
    """The eval-synth protocol, applied identically to the distilled set, the random real subset
    at the same IPC (same label mode) and the full training data (hard labels).

    Defaults are ours: SGD momentum 0.9, wd 5e-4 as the DC/DM evaluation; lr 0.01 with a cosine
    schedule instead of the reference's ×0.1 at half-time (no milestone to keep in step with
    `epochs`); DSA augmentation of every training batch for hard labels (the DSA/DM protocol);
    soft labels replay their stored crops instead. Final-epoch accuracy; best epoch only if asked."""

    students: list[str] = ["convnet3"]
    seeds: int = Field(3, ge=1)
    epochs: int = Field(300, ge=1)
    batch_size: int = Field(256, ge=1)
    optim: OptimConfig = OptimConfig(name="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4, schedule="cosine")
    augment: Literal["dsa", "crop", "none"] = "dsa"
    dsa_ops: list[str] = list(DSA_OPS)  # augment dsa: digits drop "flip"
    crop_scale: tuple[float, float] = (0.5, 1.0)  # augment crop: RandomResizedCrop area range (ImageNet: 0.08-1)
    crop_flip: bool = False
    random_subset: bool = True
    full_data: bool = True
    full_epochs: int = Field(20, ge=1)
    best_epoch: bool = False  # also report the best test epoch (labelled as such); evaluates every epoch
    eval_batch_size: int = Field(512, ge=1)

    @field_validator("students")
    @classmethod
    def _students(cls, v: list[str]) -> list[str]:
        from distill.models import is_known_model, suggest_models

        if not v:
            raise ValueError("need at least one student")
        for name in v:
            if not is_known_model(name):
                raise ValueError(f"unknown model {name!r}; allowed: any timm model name or {suggest_models(name)}")
        return v

    @field_validator("dsa_ops")
    @classmethod
    def _ops(cls, v: list[str]) -> list[str]:
        bad = [op for op in v if op not in DSA_OPS]
        if bad or not v:
            raise ValueError(f"dsa_ops must be a non-empty subset of {list(DSA_OPS)}, got {v}")
        return v


class SynthConfig(Strict):
    """One distilled dataset: data, IPC, method (+ its options), FYI flip, init, teachers, labels."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    device: Device = "auto"
    out_dir: Path = Path("runs/synth")
    data: DataConfig = DataConfig()
    ipc: int = Field(ge=1)
    method: str
    options: dict[str, Any] = {}  # validated by SYNTH_METHODS[method].Options
    flip: bool = False  # FYI: match with cat([x, mirror(x)]) at every step
    iterations: int = Field(200, ge=1)  # optimisation steps per chunk
    init: InitConfig = InitConfig()
    teachers: list[ModelConfig] = []  # bn_matching, real_confident and relabel use them
    labels: LabelConfig = LabelConfig()
    chunk: ChunkConfig = ChunkConfig()
    storage: Literal["uint8", "fp16"] = "uint8"  # dtype of the stored images
    grid_scale: int = Field(4, ge=1, le=32)  # PNG grids: pixels per image pixel (small images need it)
    # keep work/ (the per-chunk images) after the artefact is written: another recipe with the same
    # synthesis (synthesis_hash) can then start from them; off, the artefact holds only what it lists
    keep_work: bool = False
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _method(self) -> "SynthConfig":
        from synth.methods import SYNTH_METHODS

        if self.method not in SYNTH_METHODS:
            raise ValueError(f"unknown method {self.method!r}; allowed: {', '.join(SYNTH_METHODS.names())}")
        method = SYNTH_METHODS.get(self.method)
        try:
            method.Options.model_validate(self.options)
        except ValidationError as err:
            raise ValueError(format_validation_error(err, f"options of method {self.method!r}")) from None
        needs = []
        if method.needs_teachers:
            needs.append(f"method {self.method}")
        if self.init.kind == "real_confident":
            needs.append("init.kind real_confident")
        if self.labels.mode in ("relabel", "projector"):
            needs.append(f"labels.mode {self.labels.mode}")
        if needs and not self.teachers:
            raise ValueError(f"{' and '.join(needs)} need trained teachers: set teachers (a model + its checkpoint)")
        for i, t in enumerate(self.teachers):
            if needs and t.checkpoint is None:
                raise ValueError(f"teachers.{i}: {t.display_name} has no checkpoint; {' and '.join(needs)} need a "
                                 f"trained teacher (train one with `distill train`)")
        names = [t.display_name for t in self.teachers]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique (set `name:`), got {names}")
        if self.chunk.ipc is not None and self.chunk.ipc > self.ipc:
            raise ValueError(f"chunk.ipc {self.chunk.ipc} > ipc {self.ipc}")
        return self

    def method_options(self):
        from synth.methods import SYNTH_METHODS

        return SYNTH_METHODS.get(self.method).Options.model_validate(self.options)

    @property
    def run_dir(self) -> Path:
        return self.out_dir / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """Identity of the artefact (not where it is written, and not how it is evaluated)."""
        return self._hash(("out_dir", "eval", "device", "grid_scale", "keep_work"))

    def synthesis_hash(self) -> str:
        """Identity of the optimised pixels alone, which chunk files carry: a recipe that changes
        only the name, labels or storage dtype can reuse another's finished chunks."""
        return self._hash(("out_dir", "eval", "device", "grid_scale", "keep_work", "name", "labels", "storage"))

    def _hash(self, leave_out: tuple[str, ...]) -> str:
        d = self.to_dict()
        for k in leave_out:
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_synth_config(raw: dict[str, Any], source: str = "recipe") -> SynthConfig:
    try:
        return SynthConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_synth_config(path: str | Path, overrides: list[str] = ()) -> SynthConfig:
    return parse_synth_config(apply_overrides(read_yaml(path), list(overrides)), str(path))
