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
from typing import Any, ClassVar, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from distill.config import (CropScale, DataConfig, Device, LogConfig, ModelConfig, OptimConfig, Strict,
                            check_kd_temperature, format_validation_error)
from distill.errors import ConfigError
from distill.models import is_known_model, suggest_models
from synth.augment import DSA_OPS, DSA_REVISION, check_dsa
from synth.projector import ProjectorConfig


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
    are most confident on (mean probability of the class); `confident_crops`: RDED's selection, the
    start HeLlO uses: `crops_per_image` square RandomResizedCrops (`scale`) of each candidate image,
    scored by the teachers' cross-entropy on the class; each image's best crop is kept, and the
    best ipc·stitch² of those are stitched `stitch`×`stitch` into the class's images (`synth.init`)."""

    kind: Literal["noise", "real", "real_confident", "confident_crops"] = "real"
    # real_confident, confident_crops: score at most this many real images per class (None: all; RDED: 300)
    candidates: int | None = Field(None, ge=1)
    crops_per_image: int = Field(5, ge=1)  # confident_crops; RDED's scripts: --num-crop 5
    scale: CropScale = (0.08, 1.0)  # confident_crops; RDED: torchvision's RandomResizedCrop default
    stitch: int = Field(1, ge=1)  # confident_crops; RDED: 2 for 128-224 px data, 1 for 32-64 px

    OPTIONS: ClassVar[dict[str, set[str]]] = {
        "noise": set(), "real": set(), "real_confident": {"candidates"},
        "confident_crops": {"candidates", "crops_per_image", "scale", "stitch"}}

    @model_validator(mode="after")
    def _options_of_kind(self) -> "InitConfig":
        """An option of another kind would be silently ignored: refuse it (at its default it is
        harmless, and a dumped config that lists every field reads back)."""
        stray = sorted(f for f in self.model_fields_set - self.OPTIONS[self.kind] - {"kind"}
                       if getattr(self, f) != type(self).model_fields[f].default)
        if stray:
            raise ValueError(f"{', '.join(stray)}: not an option of kind {self.kind!r} "
                             f"(its options: {sorted(self.OPTIONS[self.kind]) or 'none'})")
        return self

    @property
    def needs_teachers(self) -> bool:
        return self.kind in ("real_confident", "confident_crops")

    @property
    def reals_per_image(self) -> int:
        """Distinct real images each synthetic image draws on (a stitched image: one per patch)."""
        return self.stitch ** 2 if self.kind == "confident_crops" else 1


class RelabelConfig(Strict):
    """SRe2L relabel: the teachers' soft labels on `crops_per_image` RandomResizedCrops of every
    synthetic image for each of `epochs` label epochs, written with the FKD label-store writer
    (`teachers.store`) into the artefact's `labels/`. Students replay them (epoch e uses label
    epoch e mod `epochs`): no teacher at evaluation time.

    `loss` and `temperature` are the label spec: the store keeps the teachers' softmax at
    `temperature`, and students learn it with `loss` (`students.losses`). Left out of a recipe:
    SRe2L's KL at T = 3 for `bn_matching` (`SynthConfig`), FKD's soft CE at T = 1 otherwise. An
    artefact whose recipe has neither was made at soft CE, T = 1: these defaults read it so."""

    epochs: int = Field(4, ge=1)
    crops_per_image: int = Field(1, ge=1)
    topk: int | Literal["full"] = 5
    scale: CropScale = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False  # random flip of label crops; off by default (digits are not mirror-symmetric)
    decode: Literal["marginal_smoothing", "marginal_renorm", "hard"] = "marginal_smoothing"
    batch_size: int = Field(256, ge=1)  # crops per teacher forward
    shard_images: int = Field(1024, ge=1)  # images per store shard
    loss: Literal["soft_ce", "kl"] = "soft_ce"
    temperature: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _spec(self) -> "RelabelConfig":
        check_kd_temperature(self.loss, self.temperature, "labels.relabel.loss", "labels.relabel.temperature")
        return self


# SRe2L's students learn relabelled bn_matching images by KL at T = 3 (train_KD.py/train_FKD.py -T
# default; their ImageNet scripts pass 20): a bn_matching relabel recipe that leaves them out gets these
SRE2L_LABEL_SPEC = {"loss": "kl", "temperature": 3.0}


class ImageOptConfig(Strict):
    """Ours (the paper updates the images to shrink the teacher–projector gap; its exact form is
    not published): after fitting, gradient steps on the synthetic pixels of
    ||softmax(projector(view)) − teacher(view)||² over fresh crops, teacher labels held fixed per
    step (gradient through the projector only), pixels clamped to [0, 1]. Off by default: on
    digits IPC 10 it cost 0.55 points (96.39 vs 96.94, benchmarks/hello_labels.py --image-opt)."""

    enabled: bool = False
    steps: int = Field(50, ge=1)
    lr: float = Field(0.01, gt=0)
    batch_size: int = Field(64, ge=1)


class HelloConfig(Strict):
    """The projector (`synth.projector.ProjectorConfig` fields) and how it is fitted.

    `checksum`: the expected `state_checksum` of the base; set it to refuse a checkpoint that is
    not the one meant (None: accept, and record the one found). Fit views are the crops of
    `labels.relabel` (scale, ratio, flip): the views students are served labels on."""

    kind: Literal["open_clip", "timm", "engine"] = "timm"  # engine: a checkpoint `distill train` wrote
    model: str
    checkpoint: Path | None = None  # local file; None = deterministic random init (tests only)
    checksum: str | None = None
    input_size: int | None = Field(None, ge=8)
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    head_init: Literal["text", "prototype", "random"] = "prototype"
    head_scale: float | None = Field(None, gt=0)
    template: str = "a photo of a {}."
    lora_rank: int = Field(4, ge=1)
    lora_alpha: float = Field(8.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] | str | None = None  # None: synth.projector's per-kind defaults
    steps: int = Field(300, ge=1)
    lr: float = Field(1e-3, gt=0)
    # cosine decay to 0 over `steps`: on digits (test_resnet encoder, r4, 600 steps, lr 0.01) it lifts
    # teacher agreement on fit views from 0.88 (constant lr) to 0.95
    schedule: Literal["constant", "cosine"] = "cosine"
    lam: float = Field(0.1, ge=0)  # weight of the hard-label CE term (paper: MSE + λ·CE)
    batch_size: int = Field(64, ge=1)
    real_per_class: int = Field(10, ge=0)  # real images per class added to the synthetic ones for fitting
    probe_views: int = Field(256, ge=1)  # held-out augmented views for the reported fit quality
    # precision of the stored factors (+ head); the fitted projector is rounded to it before serving
    store_dtype: Literal["float16", "float32"] = "float16"
    image_opt: ImageOptConfig = ImageOptConfig()

    def projector_config(self) -> ProjectorConfig:
        try:
            return ProjectorConfig(kind=self.kind, model_name=self.model,
                                   checkpoint=str(self.checkpoint) if self.checkpoint else None,
                                   lora_rank=self.lora_rank, lora_alpha=self.lora_alpha,
                                   lora_dropout=self.lora_dropout,
                                   lora_targets=tuple(self.lora_targets) if isinstance(self.lora_targets, list)
                                   else self.lora_targets,
                                   head_init=self.head_init, template=self.template, head_scale=self.head_scale,
                                   input_size=self.input_size, mean=self.mean, std=self.std)
        except ValueError as err:
            raise ConfigError(f"labels.projector: {err}") from None


class SynthLabelsConfig(Strict):
    """`projector` (HeLlO, `synth.hello`): a LoRA label projector fitted to the teachers replaces the
    stored labels; `relabel` then describes the crops it is fitted and served on, and the store it
    replaces (for the manifest's bytes ratio)."""

    mode: Literal["hard", "relabel", "projector"] = "hard"
    relabel: RelabelConfig = RelabelConfig()
    projector: HelloConfig | None = None

    @model_validator(mode="after")
    def _projector(self) -> "SynthLabelsConfig":
        if self.mode == "projector" and self.projector is None:
            raise ValueError("mode 'projector' needs labels.projector (at least `model:`, the base encoder)")
        if self.mode == "projector" and (self.relabel.loss, self.relabel.temperature) != ("soft_ce", 1.0):
            raise ValueError("labels.relabel.loss and labels.relabel.temperature are the relabel store's label "
                             "spec; a projector serves its softmax at T = 1 to soft CE: leave them out")
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
    # augment dsa: one op per batch (DC/DSA/DM's DiffAugment), or FYI's flip first, then one other
    # op: FYI's evaluate_synset trains with the DiffAugment it synthesises with (docs/synth.md)
    dsa_mode: Literal["single", "flip_then_one"] = "single"
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
        if not v:
            raise ValueError("need at least one student")
        for name in v:
            if not is_known_model(name):
                raise ValueError(f"unknown model {name!r}; allowed: any timm model name or {suggest_models(name)}")
        return v

    @model_validator(mode="after")
    def _dsa(self) -> "EvalConfig":
        check_dsa(self.dsa_ops, self.dsa_mode)
        return self


class SynthConfig(Strict):
    """One distilled dataset: data, IPC, method (+ its options), FYI flip, init, teachers, labels."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    seed: int = 0
    device: Device = "auto"
    # teachers' passes that need no gradient (real_confident init, relabel, HeLlO fit targets) run
    # under autocast at this precision, channels_last; bn_matching's own passes stay fp32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    out_dir: Path = Path("runs/synth")
    data: DataConfig = DataConfig()
    ipc: int = Field(ge=1)
    method: str
    options: dict[str, Any] = {}  # validated by SYNTH_METHODS[method].Options
    flip: bool = False  # FYI: match with cat([x, mirror(x)]) at every step
    iterations: int = Field(200, ge=1)  # optimisation steps per chunk
    init: InitConfig = InitConfig()
    teachers: list[ModelConfig] = []  # bn_matching, real_confident and relabel use them
    labels: SynthLabelsConfig = SynthLabelsConfig()
    chunk: ChunkConfig = ChunkConfig()
    storage: Literal["uint8", "fp16"] = "uint8"  # dtype of the stored images
    grid_scale: int = Field(4, ge=1, le=32)  # PNG grids: pixels per image pixel (small images need it)
    # keep work/ (the per-chunk images) after the artefact is written: another recipe with the same
    # synthesis (synthesis_hash) can then start from them; off, the artefact holds only what it lists
    keep_work: bool = False
    eval: EvalConfig = EvalConfig()
    log: LogConfig = LogConfig()  # how the job reports (progress lines off a terminal)

    @model_validator(mode="before")
    @classmethod
    def _relabel_spec(cls, raw: Any) -> Any:
        """A bn_matching relabel recipe silent on the label spec gets SRe2L's (`SRE2L_LABEL_SPEC`),
        filled in here, where the method is known, so the artefact's recipe states it."""
        labels = raw.get("labels") if isinstance(raw, dict) else None
        if not (isinstance(labels, dict) and labels.get("mode") == "relabel" and raw.get("method") == "bn_matching"
                and isinstance(labels.get("relabel", {}), dict)):
            return raw
        rc = {"loss": SRE2L_LABEL_SPEC["loss"], **labels.get("relabel", {})}
        if rc["loss"] == SRE2L_LABEL_SPEC["loss"]:
            rc = {"temperature": SRE2L_LABEL_SPEC["temperature"], **rc}
        return {**raw, "labels": {**labels, "relabel": rc}}

    @model_validator(mode="after")
    def _needs(self) -> "SynthConfig":
        """What the labels and init need (the method's own needs and options are checked where the
        synthesis methods are registered: `distill.recipe`)."""
        needs = []
        if self.init.needs_teachers:
            needs.append(f"init.kind {self.init.kind}")
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

    @property
    def run_dir(self) -> Path:
        return self.out_dir / self.name

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def hash(self) -> str:
        """Identity of the artefact (not where it is written, and not how it is evaluated)."""
        return self._hash(("out_dir", "eval", "device", "grid_scale", "keep_work", "log"))

    def synthesis_hash(self) -> str:
        """Identity of the optimised pixels alone, which chunk files carry: a recipe that changes
        only the name, labels or storage dtype can reuse another's finished chunks."""
        return self._hash(("out_dir", "eval", "device", "grid_scale", "keep_work", "log", "name", "labels",
                           "storage"))

    def _hash(self, leave_out: tuple[str, ...]) -> str:
        """Keys at their defaults are left out, so a field added later keeps older hashes; the DSA
        revision is in, so chunks and artefacts made with an older DSA are not reused."""
        d = self.model_dump(mode="json", exclude_defaults=True)
        for k in leave_out:
            d.pop(k, None)
        d["dsa_revision"] = DSA_REVISION
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def parse_synth_structure(raw: dict[str, Any], source: str = "recipe") -> SynthConfig:
    """The recipe's structure; `distill.recipe.parse_synth_config` adds the method's checks."""
    try:
        return SynthConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, model=SynthConfig)) from None
