"""`train(cfg)`: everything a run needs, built from a validated recipe, checked before compute.

Preflight (after the recipe parsed): the data loads, checkpoints exist and fit the data's class
count, the device and precision exist here. Then the run directory gets its resolved config and
the trainer runs; a report closes it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.artefacts import write_text
from distill.augment import RandomCrops
from distill.config import ConfigError, ModelConfig, RunConfig, dump_config
from distill.data import ImageSet, load_data
from distill.models import CHECKPOINT_FORMAT, create_model, read_checkpoint_header


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for but no CUDA device is visible; allowed here: cpu, auto")
    return dev


def check_precision(precision: str, device: torch.device) -> None:
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision: fp16 needs a CUDA device (device is {device}); use bf16 or fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision: bf16 is not supported by this GPU; use fp16 or fp32")


def check_checkpoints(cfg: RunConfig, num_classes: int) -> None:
    """Class-count mismatches are refused before compute, naming the field. (A projector teacher's
    checkpoint is its base encoder; `synth.hello.projector_teacher` checks the projector itself.)"""
    models = [("student", cfg.student)] + [(f"pool.teachers.{i}", t) for i, t in enumerate(cfg.pool.teachers if cfg.pool else [])]
    for field, m in models:
        if not isinstance(m, ModelConfig) or m.checkpoint is None:
            continue
        meta = read_checkpoint_header(m.checkpoint)
        if meta.get("format") == CHECKPOINT_FORMAT:
            # a pool teacher from another task is read through a target head fitted on pool.labelled images
            foreign_ok = field != "student" and cfg.pool is not None and cfg.pool.labelled >= 2
            if meta["num_classes"] != num_classes and not foreign_ok:
                raise ConfigError(f"{field}.checkpoint: {m.checkpoint} was trained for {meta['num_classes']} classes; "
                                  f"the data has {num_classes}"
                                  + ("" if field == "student" else " (set pool.labelled to fit a target head)"))
            if meta["model"] != m.model:
                raise ConfigError(f"{field}.model: {m.model!r} but {m.checkpoint} holds a {meta['model']!r}")


@dataclass
class RunResult:
    cfg: RunConfig
    run_dir: Path
    history: list[dict[str, Any]]
    final: dict[str, Any]


def _label_space(cfg: RunConfig, m, train: ImageSet) -> tuple[int, tuple[str, ...]]:
    """A teacher's classes: its checkpoint's own when they differ from the data's and the pool
    can fit target heads (pool.labelled), else the data's (always, for a projector: it is fitted
    for the data's classes or refused)."""
    meta = read_checkpoint_header(m.checkpoint) if isinstance(m, ModelConfig) and m.checkpoint else {}
    if meta.get("format") == CHECKPOINT_FORMAT and cfg.pool.labelled >= 2:
        return meta["num_classes"], tuple(meta["class_names"])
    return train.num_classes, train.class_names


def build_pool(cfg: RunConfig, train: ImageSet, device: torch.device, fit: bool = True):
    """The pool the recipe describes; with `fit`, weights/heads are fitted on the labelled target
    subset (`pool.labelled`) when its weighting or teachers need that (those queries are counted)."""
    from synth.hello import projector_teacher
    from teachers import EnsemblePool, create_teacher

    if cfg.pool is None:
        return None
    p = cfg.pool
    teachers = []
    for t in p.teachers:
        if isinstance(t, ModelConfig):
            classes, names = _label_space(cfg, t, train)
            teachers.append(create_teacher(t, classes, train.channels, cfg.data.image_size, names))
        else:  # a HeLlO projector (ProjectorTeacherConfig), refused unless fitted for this data
            teachers.append(projector_teacher(t, train.class_names, cfg.data.image_size, train.channels, device))
    pool = EnsemblePool(teachers, p.weights, cfg.loss.temperature, weighting=p.weighting,
                        num_classes=train.num_classes, class_names=train.class_names if p.labelled >= 2 else None,
                        weight_temperature=p.temperature, score=p.score, score_k=p.score_k, heads=p.heads,
                        confidence_targets=p.confidence_targets).to(device)
    if fit and pool.needs_fit:
        fit_pool(cfg, pool, train, device)
    return pool


def fit_pool(cfg: RunConfig, pool, train: ImageSet, device: torch.device) -> None:
    from teachers.pool import target_subset

    idx = target_subset(len(train), cfg.pool.labelled, cfg.seed)
    images = torch.stack([train[i][0] for i in idx.tolist()]).to(device).float().div_(255)
    pool.fit(images, train.targets[idx].to(device), cfg.trainer.eval_batch_size)


def train(cfg: RunConfig, data: tuple[ImageSet, ImageSet] | None = None) -> RunResult:
    from students.backends import BACKENDS
    from students.step import DistillStep
    from students.trainer import OnlineLabeler, Trainer

    if cfg.labels is not None and cfg.labels.active is not None:  # budgeted queries: rounds of trainer runs
        from distill.active import run_active

        return run_active(cfg, data)
    from distill.distributed import GlobalBatchCrops, rank_device

    device = rank_device(resolve_device(cfg.device), cfg.trainer.backend)  # cuda:LOCAL_RANK under a launcher
    check_precision(cfg.precision, device)
    train_set, test_set = data or load_data(cfg.data)
    check_checkpoints(cfg, train_set.num_classes)

    torch.manual_seed(cfg.seed)  # initial weights
    student = create_model(cfg.student.model, train_set.num_classes, train_set.channels,
                           cfg.student.input_size or cfg.data.image_size, train_set.class_names,
                           cfg.student.mean, cfg.student.std, cfg.student.drop_rate, cfg.student.checkpoint)
    step = DistillStep(student, cfg.loss)
    backend = BACKENDS.get(cfg.trainer.backend)(step, step.param_groups(cfg.optim.lr), cfg.optim, cfg.precision, device,
                                                trainer=cfg.trainer)
    if cfg.labels is not None and cfg.labels.store is not None:  # replay a label store; no teacher is built
        from distill.labels import open_store_labeler

        labeler = open_store_labeler(cfg, train_set)
    else:
        aug = cfg.data.augment
        crops = RandomCrops(aug.scale, aug.ratio, aug.flip)
        if backend.world_size * backend.grad_accum > 1:  # the global batch's crops, cut per rank/micro-step
            crops = GlobalBatchCrops(crops, backend.rank, backend.world_size, backend.grad_accum)
        labeler = OnlineLabeler(crops, build_pool(cfg, train_set, device))

    run_dir = cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if backend.is_main:
        write_text(run_dir / "config.yaml", dump_config(cfg))
    trainer = Trainer(cfg, step, backend, train_set, test_set, labeler, run_dir)
    history = trainer.fit()
    final = {**history[-1],  # summed over ranks
             "teacher_queries_by_teacher": {k: backend.reduce_sum(v) for k, v in labeler.cost.queries.items()},
             "teacher_seconds_by_teacher": {k: backend.reduce_sum(v) for k, v in labeler.cost.seconds.items()}}
    if hasattr(getattr(labeler, "source", None), "report"):  # pool weighting: weights and scores
        final["pool"] = labeler.source.report()
    if backend.is_main:
        from distill.report import write_run_report

        write_run_report(run_dir, cfg, history, final)
    return RunResult(cfg, run_dir, history, final)
