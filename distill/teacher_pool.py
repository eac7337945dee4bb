"""The recipe's teacher pool (`pool:`), built for the data and checked before compute.

Teachers are classifiers (`model:` + checkpoint) or HeLlO projectors (`projector:`); class-count
mismatches are refused naming the field, unless the pool fits target heads (`pool.labelled`).
"""
from __future__ import annotations

import torch

from distill.config import ModelConfig, RunConfig
from distill.data import ImageSet
from distill.distributed import check_precision
from distill.errors import ConfigError
from distill.models import CHECKPOINT_FORMAT, read_checkpoint_header
from synth.hello import projector_teacher
from teachers.pool import EnsemblePool, target_subset
from teachers.teacher import create_teacher


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


def _label_space(cfg: RunConfig, m, train: ImageSet) -> tuple[int, tuple[str, ...]]:
    """A teacher's classes: its checkpoint's own when they differ from the data's and the pool
    can fit target heads (pool.labelled), else the data's (always, for a projector: it is fitted
    for the data's classes or refused)."""
    meta = read_checkpoint_header(m.checkpoint) if isinstance(m, ModelConfig) and m.checkpoint else {}
    if meta.get("format") == CHECKPOINT_FORMAT and cfg.pool.labelled >= 2:
        return meta["num_classes"], tuple(meta["class_names"])
    return train.num_classes, train.class_names


def build_pool(cfg: RunConfig, train: ImageSet, device: torch.device, fit: bool = True) -> EnsemblePool | None:
    """The pool the recipe describes; with `fit`, weights/heads are fitted on the labelled target
    subset (`pool.labelled`) when its weighting or teachers need that (those queries are counted)."""
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
    precision = p.precision or cfg.precision
    check_precision(precision, device)
    for t in teachers:
        t.configure(precision, p.channels_last, cfg.trainer.compile)
    pool = EnsemblePool(teachers, p.weights, cfg.loss.temperature, weighting=p.weighting,
                        num_classes=train.num_classes, class_names=train.class_names if p.labelled >= 2 else None,
                        weight_temperature=p.temperature, score=p.score, score_k=p.score_k, heads=p.heads,
                        confidence_targets=p.confidence_targets).to(device)
    if fit and pool.needs_fit:
        fit_pool(cfg, pool, train, device)
    return pool


def fit_pool(cfg: RunConfig, pool: EnsemblePool, train: ImageSet, device: torch.device) -> None:
    idx = target_subset(len(train), cfg.pool.labelled, cfg.seed)
    images = torch.stack([train[i][0] for i in idx.tolist()]).to(device).float().div_(255)
    pool.fit(images, train.targets[idx].to(device), cfg.trainer.eval_batch_size)
