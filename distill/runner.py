"""`train(cfg)`: the `distill train` job, built from a validated recipe, checked before compute.

Preflight (after the recipe parsed): the data loads, checkpoints exist and fit the data's class
count, the device and precision exist here. Then the run builder (`students.build`) makes the
student, step and backend; the recipe's label source (`teachers.labeling`) makes the labeler; the
run directory gets its resolved config, the trainer runs, and a report closes it. A label source
with a job of its own (active rounds) runs that instead.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from distill.artefacts import ensure_writable, write_text
from distill.augment import RandomCrops
from distill.config import RunConfig, dump_config
from distill.data import ImageSet, eval_protocol, eval_transform_for, load_data
from distill.distributed import GlobalBatchCrops, check_precision, rank_device, resolve_device
from distill.errors import ArtefactError
from distill.imagefiles import ImageFiles
from distill.progress import set_interval
from distill.recipe import as_run_config
from distill.report import write_run_report
from distill.teacher_pool import build_pool, check_checkpoints
from students.build import RunResult, create_backend, create_step
from students.trainer import Trainer
from teachers.labeling import LabelContext, labeling_for
from teachers.source import Views, as_loaded


def training_views(cfg: RunConfig, backend, train_set=None) -> Views:
    """The recipe's random crops (`data.augment`); under several ranks or micro-steps, the global
    batch's crops cut for this rank's images (distill.distributed). Image files arrive already cut
    (in the loader's workers, from the whole photo: distill.imagefiles), so their views are as loaded."""
    if isinstance(train_set, ImageFiles):
        return as_loaded
    aug = cfg.data.augment
    crops = RandomCrops(aug.scale, aug.ratio, aug.flip)
    if backend.world_size * backend.grad_accum > 1:
        return GlobalBatchCrops(crops, backend.rank, backend.world_size, backend.grad_accum)
    return crops


def final_record(history: list[dict[str, Any]], labeler, backend) -> dict[str, Any]:
    """The last epoch's record with what each teacher was asked, summed over ranks."""
    return {**history[-1],
            "teacher_queries_by_teacher": {k: backend.reduce_sum(v) for k, v in labeler.cost.queries.items()},
            "teacher_seconds_by_teacher": {k: backend.reduce_sum(v) for k, v in labeler.cost.seconds.items()}}


def preflight(cfg: RunConfig, data: tuple[ImageSet, ImageSet] | None = None
              ) -> tuple[torch.device, ImageSet, ImageSet]:
    """What `train` checks before any compute, and all `distill validate` runs: the device and
    precision exist here, the data loads as the recipe says (arrays, labels, class folders), the
    checkpoints' headers fit its classes."""
    device = rank_device(resolve_device(cfg.device), cfg.trainer.backend)  # cuda:LOCAL_RANK under a launcher
    check_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed-size batches: let cuDNN pick its fastest kernels once
    train_set, test_set = data or load_data(cfg.data, eval_transform_for(cfg))
    check_checkpoints(cfg, train_set.num_classes)
    return device, train_set, test_set


def train(cfg: RunConfig | str | Path | dict, data: tuple[ImageSet, ImageSet] | None = None) -> RunResult:
    """Train the recipe's student (a path, a mapping or a parsed `RunConfig`)."""
    cfg = as_run_config(cfg)
    set_interval(cfg.log.every_seconds)
    labeling = labeling_for(cfg)
    result = labeling.run_job(cfg, data)
    if result is not None:
        return result
    device, train_set, test_set = preflight(cfg, data)
    step = create_step(cfg, train_set)
    backend = create_backend(cfg, step, device)
    labeler = labeling.build(LabelContext(train_set, device, training_views(cfg, backend, train_set),
                                          lambda: build_pool(cfg, train_set, device), cfg))
    trainer = Trainer(cfg, step, backend, train_set, test_set, labeler, cfg.run_dir)
    trainer.check_resume()  # refused before anything is written (another recipe's run directory)
    if (cfg.run_dir / "active" / "state.safetensors").exists():
        raise ArtefactError(f"{cfg.run_dir}: holds an active-distillation job (labels.active); use another "
                            f"`name`/`out_dir`")
    ensure_writable(cfg.run_dir, "out_dir")
    if backend.is_main:
        write_text(cfg.run_dir / "config.yaml", dump_config(cfg))
    history = trainer.fit()
    final = {**final_record(history, labeler, backend), **labeling.summary(labeler), "eval_protocol": eval_protocol(test_set)}
    if backend.is_main:
        write_run_report(cfg.run_dir, cfg, history, final, labeling.describe(cfg),
                         [*labeling.report(final), f"- evaluation: {final['eval_protocol']}", ""])
    return RunResult(cfg, cfg.run_dir, history, final)
