"""`Trainer`: one loop for every student job — hard labels, online teachers, stored labels.

One DataLoader serves the whole run (its workers persist; image files are decoded and cropped in
them, distill.imagefiles). Per epoch: seeded order and crops → labels from the batch labeler
(outside the backend: teachers are frozen and replicated) → `DistillStep` → backend, every step
checked finite (loss; gradients or weights; `trainer.on_nonfinite`, docs/errors.md) and logged
(`distill.step_log`). Then evaluation, an atomic checkpoint of everything a resume needs, and one
metrics line. A killed run resumes from its last checkpoint and finishes with the same weights as
an uninterrupted one (CPU; per-epoch seeding, loader workers or not).
Under several ranks (DeepSpeed backend) each loads its share of the global batch, drawn as one
process would draw it (distill.distributed); losses and test metrics are reduced over ranks, and
checkpoints go through the backend (collective), so the loop is the same for every backend.
"""
from __future__ import annotations

import math
import time
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

from distill.artefacts import strict_json, write_text
from distill.config import RunConfig
from distill.data import ImageSet, collate_skipping
from distill.distributed import ShardedSampler, micro_batch
from distill.errors import ConfigError, TrainingError
from distill.imagefiles import EpochKeys, ImageFiles, RandomCropPlan, TrainViews, collate_views
from distill.models import save_model
from distill.progress import Progress, say
from distill.step_log import StepLog
from distill.webdataset_source import ShardStream, WebDatasetSet
from students.accuracy import eval_loader, evaluate
from students.backends import lr_factor, warmup_factor
from students.step import DistillStep
from teachers.source import BatchLabeler


def seed_for(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def gpu_memory(device: torch.device) -> dict[str, float]:
    """Peak memory allocated on a GPU (bytes), for the step log; nothing on the CPU."""
    if device.type != "cuda":
        return {}
    return {"gpu_memory_bytes": float(torch.cuda.max_memory_allocated(device))}


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
        self.start_epoch, self.global_step, self.epoch_start, self.skipped = 0, 0, 0, 0
        self.loader: DataLoader | None = None
        self.test_loader: DataLoader | None = None
        log = cfg.log
        self.steps = StepLog(self.run_dir, log.every_steps, log.tensorboard, enabled=backend.is_main)

    # ---------------------------------------------------------------- the loop
    def fit(self) -> list[dict[str, Any]]:
        cfg = self.cfg.trainer
        self.maybe_resume()
        try:
            for epoch in range(self.start_epoch, cfg.epochs):
                record = self.train_epoch(epoch)
                record.update({f"test_{k}": v for k, v in self.evaluate().items()})
                self.history.append(record)
                self.steps.epoch(self.global_step, record)
                if (epoch + 1) % cfg.checkpoint_every == 0 or epoch + 1 == cfg.epochs:
                    self.save_checkpoint(epoch + 1)
                say(f"[{self.cfg.name}] epoch {epoch + 1}/{cfg.epochs} loss {record['train_loss']:.4f} "
                    f"top1 {record['test_top1']:.2f} ({record['epoch_seconds']:.1f}s)")
        finally:
            self.steps.close()
        if self.backend.is_main:
            save_model(self.run_dir / "student.safetensors", self.step.student, {"config_hash": self.cfg.hash()})
        return self.history

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass: seeded order and crops → labeler → step → backend; the epoch's record."""
        cfg, dev, b = self.cfg.trainer, self.backend.device, self.backend
        torch.manual_seed(seed_for(self.cfg.seed, epoch) + 7919 * b.rank)  # dropout etc.
        # the global batch's order and crops come from `gen`, drawn alike on every rank; each rank
        # keeps its share (distill.distributed); whole accumulation windows only
        gen = torch.Generator().manual_seed(seed_for(self.cfg.seed, epoch))
        loader = self.epoch_loader(epoch, gen)
        micro_steps = len(loader) // b.grad_accum * b.grad_accum  # the backend's accumulation: it steps per window
        if micro_steps == 0:
            raise ConfigError(f"trainer.grad_accum {b.grad_accum}: {len(self.train_set)} training images do not fill "
                              f"one optimiser step of trainer.batch_size {cfg.batch_size}")
        self.global_step = self.epoch_start = epoch * micro_steps
        epoch_lr, optim = lr_factor(self.cfg.optim, epoch, cfg.epochs), self.cfg.optim
        b.set_lr(epoch_lr * warmup_factor(optim, self.global_step // b.grad_accum))
        self.step.train()
        sums: dict[str, float] = {}
        steps, seen, start = 0, 0, time.perf_counter()
        bar = Progress(islice(loader, micro_steps), total=micro_steps, desc=f"{self.cfg.name} {epoch + 1}/{cfg.epochs}",
                       unit="step", leave=False, enabled=b.is_main)
        ready = time.perf_counter()
        for loaded_batch in bar:
            if loaded_batch is None:  # every image of it failed to decode (data.on_bad_image: skip)
                continue
            if optim.warmup_steps and self.global_step % b.grad_accum == 0:  # a new optimiser step
                b.set_lr(epoch_lr * warmup_factor(optim, self.global_step // b.grad_accum))
            loaded, teacher_s = time.perf_counter(), self.labeler.cost.total_seconds
            values = self.train_step(epoch, gen, *loaded_batch)
            done = time.perf_counter()
            if values is not None:
                for k, v in values.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps, seen = steps + 1, seen + len(loaded_batch[0])
                bar.set_postfix(loss=f"{sums['loss'] / steps:.3f}")
                if self.steps.due(self.global_step, steps == micro_steps):
                    self.steps.step(epoch + 1, self.global_step, {
                        **values, "lr": b.optimizer.param_groups[0]["lr"],
                        "images_per_second": len(loaded_batch[0]) / (done - ready), "data_seconds": loaded - ready,
                        "compute_seconds": done - loaded, "teacher_seconds": self.labeler.cost.total_seconds - teacher_s,
                        **gpu_memory(dev)})
            self.global_step, ready = self.global_step + 1, done
        seconds = time.perf_counter() - start
        return {"epoch": epoch + 1, "lr": b.optimizer.param_groups[0]["lr"], "skipped_steps": self.skipped,
                **{f"train_{k}": b.reduce_mean(v / max(steps, 1)) for k, v in sums.items()},
                "epoch_seconds": seconds, "images_per_second": b.reduce_sum(seen) / seconds,
                "teacher_queries": b.reduce_sum(self.labeler.cost.total_queries),
                "teacher_seconds": b.reduce_sum(self.labeler.cost.total_seconds),
                **({"bad_images_skipped": self.train_set.skipped} if hasattr(self.train_set, "skipped") else {})}

    def epoch_loader(self, epoch: int, gen: torch.Generator) -> DataLoader:
        """The run's one DataLoader (built at the first epoch; workers persist), set to `epoch`: the
        order is drawn from `gen` (in-memory data also draws its crops from it afterwards), image
        files' crops are keyed by (seed, epoch, index), shards are dealt by (seed, epoch)."""
        if self.loader is None:
            self.loader = self.build_loader()
        data = self.loader.dataset
        if isinstance(data, ShardStream):
            data.set_epoch(epoch)
        else:
            sampler = self.loader.sampler
            if isinstance(sampler, EpochKeys):
                sampler.set_epoch(epoch)
                sampler = sampler.sampler
            sampler.generator = gen
        return self.loader

    def build_loader(self) -> DataLoader:
        """In-memory data: images by a sharded permutation, cropped later per batch. Image files:
        every image's crops (`data.crops_per_image`, or the label store's) cut in the workers from
        one decode, views flattened image-major (trainer.batch_size counts images)."""
        cfg, b, data, lc = self.cfg.trainer, self.backend, self.train_set, self.cfg.data.loader
        workers = cfg.num_workers
        opts = {"batch_size": micro_batch(cfg.batch_size, b.world_size, b.grad_accum), "num_workers": workers,
                "pin_memory": b.device.type == "cuda" if lc.pin_memory == "auto" else lc.pin_memory,
                "persistent_workers": workers > 0 and lc.persistent_workers,
                "prefetch_factor": lc.prefetch_factor if workers else None,
                # worker seeds come from here, never from the global RNG (dropout's, per epoch)
                "generator": torch.Generator().manual_seed(self.cfg.seed)}
        drop_last = len(data) > cfg.batch_size
        if not isinstance(data, ImageFiles):
            return DataLoader(data, sampler=ShardedSampler(len(data), b.rank, b.world_size, None), drop_last=drop_last,
                              collate_fn=collate_skipping, **opts)
        aug = self.cfg.data.augment
        plan = getattr(self.labeler, "crop_plan", None) or RandomCropPlan(
            self.cfg.seed, self.cfg.data.crops_per_image, tuple(aug.scale), tuple(aug.ratio), 0.5 if aug.flip else 0.0)
        if isinstance(data, WebDatasetSet):
            return DataLoader(ShardStream(data, plan, self.cfg.seed, b.rank, b.world_size), drop_last=True,
                              collate_fn=collate_views, **opts)
        sampler = EpochKeys(ShardedSampler(len(data), b.rank, b.world_size, None))
        return DataLoader(TrainViews(data, plan), sampler=sampler, drop_last=drop_last, collate_fn=collate_views, **opts)

    def train_step(self, epoch: int, gen: torch.Generator, images: torch.Tensor, targets: torch.Tensor,
                   index: torch.Tensor) -> dict[str, float] | None:
        """Labeler → forward → checks → backward → step. The loss terms, or None when the step was
        skipped for a non-finite loss or gradient (on_nonfinite: skip_step)."""
        b = self.backend
        images, targets = images.to(b.device, non_blocking=True).float().div_(255), targets.to(b.device)
        batch = self.labeler(images, targets, index, epoch, gen)
        if self.cfg.data.loader.channels_last:
            batch.images = batch.images.contiguous(memory_format=torch.channels_last)
        with b.autocast():
            terms = b.module(batch.images, batch.targets, batch.soft)
        values = {k: v.item() for k, v in terms.items()}
        if b.reduce_sum(0.0 if all(map(math.isfinite, values.values())) else 1.0):  # every rank agrees
            return self.nonfinite("loss", epoch, values)
        b.backward(terms["loss"])
        if not b.grads_finite():
            b.discard()
            return self.nonfinite("gradient", epoch, values)
        b.step()
        if not b.checks_gradients and (self.global_step + 1) % b.grad_accum == 0 and not self.weights_finite():
            self.nonfinite("weight after the optimiser step", epoch, values, can_skip=False)
        return values

    def nonfinite(self, what: str, epoch: int, values: dict[str, float], can_skip: bool = True) -> None:
        """A non-finite loss/gradient/weight at this step: skip it (on_nonfinite: skip_step, while
        the budget lasts) or stop with the run's last good checkpoint intact (TrainingError)."""
        cfg, terms = self.cfg.trainer, ", ".join(f"{k} {v:.4g}" for k, v in values.items())
        where = f"epoch {epoch + 1}, step {self.global_step - self.epoch_start + 1} of the epoch (run step {self.global_step})"
        if can_skip and cfg.on_nonfinite == "skip_step" and self.skipped < cfg.max_skipped_steps:
            self.skipped += 1
            say(f"[{self.cfg.name}] non-finite {what} at {where} ({terms}): step skipped "
                f"({self.skipped}/{cfg.max_skipped_steps} allowed, trainer.max_skipped_steps)")
            return
        saved = (f"the last good checkpoint {self.ckpt_path} (after epoch {len(self.history)}) is intact"
                 if self.ckpt_path.is_file() else "no epoch had finished, so nothing was saved")
        raise TrainingError(
            f"{self.cfg.name}: non-finite {what} at {where}: {terms}. Training stopped; {saved}. Fix the cause (e.g. "
            f"optim.lr=<lower>, trainer.grad_clip=1.0, precision=fp32, or trainer.on_nonfinite=skip_step) and rerun "
            f"the same command with those overrides: it resumes from that checkpoint (resumable keys: docs/errors.md)")

    def weights_finite(self) -> bool:
        return bool(torch.isfinite(torch.stack(torch._foreach_norm([p.detach() for p in self.step.parameters()]))).all())

    def evaluate(self) -> dict[str, float]:
        """Each rank scores its interleaved share of the test set; per-image sums are reduced."""
        if not self.eval_each_epoch and len(self.history) + 1 < self.cfg.trainer.epochs:
            return {"top1": math.nan, "top5": math.nan, "loss": math.nan}
        b, n = self.backend, len(self.test_set)
        if self.test_loader is None:  # built once: its decoding workers persist across epochs
            part = self.test_set if b.world_size == 1 else Subset(self.test_set, range(b.rank, n, b.world_size))
            self.test_loader = eval_loader(part, self.cfg.trainer.eval_batch_size, b.device,
                                           self.cfg.trainer.num_workers, self.cfg.data.loader.persistent_workers)
        m = evaluate(self.step.student, self.test_loader, device=b.device, precision=self.cfg.precision,
                     channels_last=self.cfg.data.loader.channels_last)
        return m if b.world_size == 1 else {k: b.reduce_sum(v * len(self.test_loader.dataset)) / n for k, v in m.items()}

    # ---------------------------------------------------------------- checkpoint / resume
    def save_checkpoint(self, epochs_done: int) -> None:
        """Through the backend (every rank calls it: a DeepSpeed checkpoint is collective)."""
        state = {"epochs_done": epochs_done, "history": self.history, "skipped_steps": self.skipped,
                 "cost": {"queries": self.labeler.cost.queries, "seconds": self.labeler.cost.seconds}}
        self.backend.save_checkpoint(self.ckpt_path, state, {"config_hash": self.cfg.hash(), "epochs_done": epochs_done,
                                                             "resume_hash": self.cfg.resume_hash()})
        if self.backend.is_main:
            self._write_metrics()

    def check_resume(self) -> dict[str, Any] | None:
        """The checkpoint's header, refused (writing nothing) when another recipe wrote it; keys in
        `distill.config.RESUMABLE` (epochs, lr, clipping, ...) may differ."""
        meta = self.backend.checkpoint_meta(self.ckpt_path)
        if meta is None:
            return None
        self.cfg.check_written_by(self.ckpt_path, meta)
        return meta

    def maybe_resume(self) -> None:
        if self.check_resume() is None:
            self.steps.resume(0)
            return
        state = self.backend.load_checkpoint(self.ckpt_path)
        self.start_epoch, self.history = state["epochs_done"], state["history"]
        self.skipped = state.get("skipped_steps", 0)
        self.labeler.cost.queries.update(state["cost"]["queries"])  # rank 0's; ranks query alike
        self.labeler.cost.seconds.update(state["cost"]["seconds"])
        self.steps.resume(self.start_epoch)
        if self.backend.is_main:
            self._write_metrics()
            say(f"[{self.cfg.name}] resumed after epoch {self.start_epoch}")

    def _write_metrics(self) -> None:
        """metrics.jsonl is rewritten whole from the checkpointed history, so it never holds an
        epoch that a resume will run again."""
        write_text(self.run_dir / "metrics.jsonl", "".join(strict_json(r) + "\n" for r in self.history))
