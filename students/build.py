"""The run builder: recipe → student → `DistillStep` → backend, written once (then `Trainer`).

Every job that trains a student builds it here: `distill train`, each active-distillation round,
eval-synth's protocol students, the benchmarks. The labeler is the caller's (it may depend on the
backend's rank and world, e.g. crops of a global batch).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.config import RunConfig
from distill.data import ImageSet
from distill.models import ImageClassifier, create_model
from students.backends import BACKENDS
from students.step import DistillStep


@dataclass
class RunResult:
    """What a training job returns: its recipe, run directory, per-epoch history and final record."""

    cfg: RunConfig
    run_dir: Path
    history: list[dict[str, Any]]
    final: dict[str, Any]


def create_student(cfg: RunConfig, data: ImageSet) -> ImageClassifier:
    """The recipe's student for `data`; its initial weights are a function of `cfg.seed` alone."""
    s = cfg.student
    torch.manual_seed(cfg.seed)
    model = create_model(s.model, data.num_classes, data.channels, s.input_size or cfg.data.image_size,
                         data.class_names, s.mean, s.std, s.drop_rate, s.checkpoint, s.pretrained)
    if cfg.data.loader.channels_last and cfg.trainer.backend == "plain":  # before the optimiser sees its weights
        # (DeepSpeed's broadcast views each weight as bytes, which fails on channels_last strides; its
        # weights stay contiguous and only the batches go channels_last)
        model.to(memory_format=torch.channels_last)
    if cfg.trainer.compile:
        model.compile()  # in place: checkpoints keep the model's own keys
    return model


def create_step(cfg: RunConfig, data: ImageSet) -> DistillStep:
    return DistillStep(create_student(cfg, data), cfg.loss)


def create_backend(cfg: RunConfig, step: DistillStep, device: torch.device):
    """The recipe's backend (`trainer.backend`) around `step`, with its optimiser and precision."""
    return BACKENDS.get(cfg.trainer.backend)(step, step.param_groups(cfg.optim.lr), cfg.optim, cfg.precision, device,
                                             trainer=cfg.trainer)

