"""`Trainer`: one loop for every student job — hard labels, online teachers, stored labels.

Per epoch: seeded order and crops → labels from the batch labeler (outside the backend: teachers
are frozen and replicated) → `DistillStep` → backend. Then evaluation, an atomic checkpoint of
everything a resume needs, and one metrics line. A killed run resumes from its last checkpoint and
finishes with the same weights as an uninterrupted one (CPU; per-epoch seeding).
Under several ranks (DeepSpeed backend) each loads its share of the global batch, drawn as one
process would draw it (distill.distributed); losses and test metrics are reduced over ranks, and
checkpoints go through the backend (collective), so the loop is the same for every backend.
"""
from __future__ import annotations

import json
import math
import time
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from distill.artefacts import write_text
from distill.config import RunConfig
from distill.data import ImageSet
from distill.distributed import ShardedSampler, micro_batch
from distill.errors import ArtefactError, ConfigError
from distill.models import save_model
from students.accuracy import evaluate
from students.backends import lr_factor
from students.step import DistillStep
from teachers.source import BatchLabeler


def seed_for(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


class Trainer:
    """`eval_each_epoch=False` scores the test set at the last epoch only (NaN before): eval-synth's
    protocol reports final-epoch accuracy, and evaluation dominates its tiny runs."""

    def __init__(self, cfg: RunConfig, step: DistillStep, backend, train: ImageSet, test: ImageSet,
                 labeler: BatchLabeler, run_dir: Path, eval_each_epoch: bool = True):
        self.cfg, self.step, self.backend, self.eval_each_epoch = cfg, step, backend, eval_each_epoch
        self.train_set, self.test_set, self.labeler = train, test, labeler
        self.run_dir = Path(run_dir)
        self.ckpt_path = self.run_dir / "checkpoints" / "last.safetensors"
        self.history: list[dict[str, Any]] = []
        self.start_epoch = 0

    # ---------------------------------------------------------------- the loop
    def fit(self) -> list[dict[str, Any]]:
        cfg, dev = self.cfg.trainer, self.backend.device
        self.maybe_resume()
        for epoch in range(self.start_epoch, cfg.epochs):
            torch.manual_seed(seed_for(self.cfg.seed, epoch) + 7919 * self.backend.rank)  # dropout etc.
            # the global batch's order and crops come from `gen`, drawn alike on every rank; each rank
            # keeps its share (distill.distributed); whole accumulation windows only
            gen = torch.Generator().manual_seed(seed_for(self.cfg.seed, epoch))
            world, accum = self.backend.world_size, self.backend.grad_accum  # the backend's: it steps per window
            loader = DataLoader(self.train_set, batch_size=micro_batch(cfg.batch_size, world, accum),
                                sampler=ShardedSampler(len(self.train_set), self.backend.rank, world, gen),
                                generator=gen, num_workers=cfg.num_workers,
                                drop_last=len(self.train_set) > cfg.batch_size)
            micro_steps = len(loader) // accum * accum
            if micro_steps == 0:
                raise ConfigError(f"trainer.grad_accum {accum}: {len(self.train_set)} training images do not fill one "
                                  f"optimiser step of trainer.batch_size {cfg.batch_size}")
            self.backend.set_lr(lr_factor(self.cfg.optim, epoch, cfg.epochs))
            self.step.train()
            sums: dict[str, float] = {}
            steps, seen, start = 0, 0, time.perf_counter()
            bar = tqdm(islice(loader, micro_steps), total=micro_steps, desc=f"{self.cfg.name} {epoch + 1}/{cfg.epochs}",
                       leave=False, dynamic_ncols=True,
                       disable=None if self.backend.is_main else True)  # None: off when not a terminal
            for images, targets, index in bar:
                images, targets = images.to(dev, non_blocking=True).float().div_(255), targets.to(dev)
                batch = self.labeler(images, targets, index, epoch, gen)
                with self.backend.autocast():
                    terms = self.backend.module(batch.images, batch.targets, batch.soft)
                self.backend.backward(terms["loss"])
                self.backend.step()
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + v.item()
                steps, seen = steps + 1, seen + len(images)
                bar.set_postfix(loss=f"{sums['loss'] / steps:.3f}")
            seconds = time.perf_counter() - start
            record = {"epoch": epoch + 1, "lr": self.backend.optimizer.param_groups[0]["lr"],
                      **{f"train_{k}": self.backend.reduce_mean(v / max(steps, 1)) for k, v in sums.items()},
                      "epoch_seconds": seconds, "images_per_second": self.backend.reduce_sum(seen) / seconds,
                      "teacher_queries": self.backend.reduce_sum(self.labeler.cost.total_queries),
                      "teacher_seconds": self.backend.reduce_sum(self.labeler.cost.total_seconds)}
            record.update({f"test_{k}": v for k, v in self.evaluate().items()})
            self.history.append(record)
            if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                self.save_checkpoint(epoch + 1)
            if self.backend.is_main:
                tqdm.write(f"[{self.cfg.name}] epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f} "
                           f"top1 {record['test_top1']:.2f} ({seconds:.1f}s)")
        if self.backend.is_main:
            save_model(self.run_dir / "student.safetensors", self.step.student, {"config_hash": self.cfg.hash()})
        return self.history

    def evaluate(self) -> dict[str, float]:
        """Each rank scores its interleaved share of the test set; per-image sums are reduced."""
        if not self.eval_each_epoch and len(self.history) + 1 < self.cfg.trainer.epochs:
            return {"top1": math.nan, "top5": math.nan, "loss": math.nan}
        b, n = self.backend, len(self.test_set)
        part = self.test_set if b.world_size == 1 else Subset(self.test_set, range(b.rank, n, b.world_size))
        m = evaluate(self.step.student, part, self.cfg.trainer.eval_batch_size, b.device, self.cfg.trainer.num_workers)
        return m if b.world_size == 1 else {k: b.reduce_sum(v * len(part)) / n for k, v in m.items()}

    # ---------------------------------------------------------------- checkpoint / resume
    def save_checkpoint(self, epochs_done: int) -> None:
        """Through the backend (every rank calls it: a DeepSpeed checkpoint is collective)."""
        state = {"epochs_done": epochs_done, "history": self.history,
                 "cost": {"queries": self.labeler.cost.queries, "seconds": self.labeler.cost.seconds}}
        self.backend.save_checkpoint(self.ckpt_path, state, {"config_hash": self.cfg.hash(), "epochs_done": epochs_done})
        if self.backend.is_main:
            self._write_metrics()

    def maybe_resume(self) -> None:
        meta = self.backend.checkpoint_meta(self.ckpt_path)
        if meta is None:
            return
        if meta.get("config_hash") != self.cfg.hash():
            raise ArtefactError(
                f"{self.ckpt_path}: written by a different recipe (config hash {meta.get('config_hash')} != "
                f"{self.cfg.hash()}); use another `name`/`out_dir`, or delete the run directory to start over")
        state = self.backend.load_checkpoint(self.ckpt_path)
        self.start_epoch, self.history = state["epochs_done"], state["history"]
        self.labeler.cost.queries.update(state["cost"]["queries"])  # rank 0's; ranks query alike
        self.labeler.cost.seconds.update(state["cost"]["seconds"])
        if self.backend.is_main:
            self._write_metrics()
            tqdm.write(f"[{self.cfg.name}] resumed after epoch {self.start_epoch}")

    def _write_metrics(self) -> None:
        """metrics.jsonl is rewritten whole from the checkpointed history, so it never holds an
        epoch that a resume will run again."""
        write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
