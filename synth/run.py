"""`distill synth RECIPE`: synthesise a distilled dataset, resumable, sharded over ranks.

The work is cut into chunks of `chunk.classes` classes × `chunk.ipc` images per class. Rank r of
W (`RANK`/`WORLD_SIZE`, as plain `torchrun` sets them) takes chunks r, r + W, ...; each finished
chunk is written atomically to `work/`, so a killed run resumes from its last finished chunk.
Every chunk's randomness is keyed by (seed, chunk), so results do not depend on the number of
ranks or restarts. The process that finds every chunk done merges them (no second pass over the
synthesis), relabels when asked (all ranks share that work through the label store's sharding)
and writes the artefact (`synth.artefact`).
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.artefacts import ensure_writable, load_tensors, read_metadata, save_tensors, sha256_file
from distill.config import dump_config
from distill.data import ImageSet, load_data
from distill.distributed import check_precision, rank_world, resolve_device
from distill.errors import ArtefactError, ConfigError
from distill.models import CHECKPOINT_FORMAT, read_checkpoint_header
from distill.progress import Progress, set_interval
from synth.artefact import MANIFEST, as_imageset, quantise, read_manifest, write_artefact
from synth.config import SynthConfig
from synth.hello import hello_step, preflight
from synth.init import check_init, class_indices, init_images, keyed_generator
from synth.methods import SYNTH_METHODS, SynthContext, SynthMethod, data_stats
from synth.objectives import flip_concat
from synth.relabel import relabel_store, resolve_topk
from teachers.teacher import create_teacher

WORK = "work"


@dataclass(frozen=True)
class Chunk:
    classes: tuple[int, ...]
    ipc_lo: int
    ipc_hi: int

    @property
    def name(self) -> str:
        return f"c{self.classes[0]:05d}-{self.classes[-1]:05d}_i{self.ipc_lo:04d}-{self.ipc_hi - 1:04d}"

    @property
    def num_images(self) -> int:
        return len(self.classes) * (self.ipc_hi - self.ipc_lo)


def plan_chunks(cfg: SynthConfig, num_classes: int) -> list[Chunk]:
    per_c = cfg.chunk.classes or num_classes
    per_i = cfg.chunk.ipc or cfg.ipc
    return [Chunk(tuple(range(c0, min(c0 + per_c, num_classes))), i0, min(i0 + per_i, cfg.ipc))
            for c0 in range(0, num_classes, per_c) for i0 in range(0, cfg.ipc, per_i)]


@dataclass
class SynthResult:
    root: Path
    manifest: dict[str, Any] | None  # None: this rank finished, others still working
    rank: int
    world: int
    seconds: float
    chunks_run: int

    def summary(self) -> str:
        if self.manifest is None:
            return (f"{self.root}: rank {self.rank}/{self.world} finished its chunks ({self.chunks_run} run) in "
                    f"{self.seconds:.1f}s; the artefact is written when the last rank finishes")
        m = self.manifest
        return (f"{self.root}: {m['method']}{' + FYI flip' if m['flip'] else ''}, IPC {m['ipc']} × {m['num_classes']} "
                f"classes, {m['storage']} images {m['bytes']['images']:,} B, labels {m['label_mode']} "
                f"{m['bytes']['labels']:,} B; {m['timing']['seconds_per_class']:.2f} s per class "
                f"({self.chunks_run} chunk(s) run now, {self.seconds:.1f}s)")


def build_teachers(cfg: SynthConfig, real: ImageSet, device: torch.device) -> list:
    out = []
    for i, t in enumerate(cfg.teachers):
        meta = read_checkpoint_header(t.checkpoint) if t.checkpoint else {}
        if meta.get("format") == CHECKPOINT_FORMAT and meta["num_classes"] != real.num_classes:
            raise ConfigError(f"teachers.{i}.checkpoint: {t.checkpoint} was trained for {meta['num_classes']} "
                              f"classes; the data has {real.num_classes}")
        teacher = create_teacher(t, real.num_classes, real.channels, real.image_size, real.class_names).to(device)
        out.append(teacher.configure(cfg.precision, channels_last=cfg.precision != "fp32"))
    return out


def teacher_records(cfg: SynthConfig) -> list[dict[str, Any]]:
    return [{"name": t.display_name, "model": t.model, "checkpoint": str(t.checkpoint) if t.checkpoint else None,
             "checkpoint_sha256": sha256_file(t.checkpoint) if t.checkpoint else None} for t in cfg.teachers]


def optimise(method: SynthMethod, x0: torch.Tensor, y: torch.Tensor, ctx: SynthContext, iterations: int,
             flip: bool, generator: torch.Generator, desc: str, progress: bool) -> tuple[torch.Tensor, float]:
    """The loop every method shares: pixels in normalised space, the method's optimiser and
    schedule, FYI flip-concat before the objective, optional clipping. Returns images in [0, 1]
    space (unclipped unless the method clips) and the last loss."""
    oc = method.image_optim()
    mean, std = ctx.mean.to(x0.device), ctx.std.to(x0.device)
    z = ((x0 - mean) / std).detach().clone().requires_grad_(True)
    opt = (torch.optim.Adam([z], lr=oc.lr, betas=oc.betas) if oc.name == "adam"
           else torch.optim.SGD([z], lr=oc.lr, momentum=oc.momentum))
    last = torch.tensor(float("nan"))
    bar = Progress(range(iterations), desc=desc, unit="step", leave=False, enabled=progress)
    for step in bar:
        factor = 0.5 * (1 + math.cos(math.pi * step / iterations)) if oc.schedule == "cosine" else 1.0
        for g in opt.param_groups:
            g["lr"] = oc.lr * factor
        x = z * std + mean
        xb, yb = flip_concat(x, y) if flip else (x, y)
        terms = method.loss(xb, yb, step, generator)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        if method.clip:
            with torch.no_grad():
                z.copy_(((z * std + mean).clamp(0, 1) - mean) / std)
        last = terms["loss"].detach()  # read back only when shown: no device sync per step
        if step % 10 == 0 or step == iterations - 1:
            bar.set_postfix(loss=f"{float(last):.4f}")
    return (z * std + mean).detach(), float(last)


class SynthJob:
    """Everything one process needs, built and checked before any optimisation step."""

    def __init__(self, cfg: SynthConfig, rank: int, world: int, data: tuple[ImageSet, ImageSet] | None,
                 progress: bool):
        self.cfg, self.rank, self.world, self.progress = cfg, rank, world, progress
        self.root = cfg.run_dir
        self.device = resolve_device(cfg.device)
        check_precision(cfg.precision, self.device)
        self.real, _ = data or load_data(cfg.data)
        self.by_class = class_indices(self.real)
        empty = [self.real.class_names[c] for c, i in self.by_class.items() if len(i) == 0]
        if empty:
            raise ConfigError(f"data: class(es) {empty[:8]} have no training images; every class needs real images")
        check_init(cfg.init, cfg.ipc, self.real, self.by_class)
        self.mean, self.std = data_stats(self.real, cfg.seed)
        self.method_cls = SYNTH_METHODS.get(cfg.method)
        self.opts = self.method_cls.Options.model_validate(cfg.options)
        self.teachers = build_teachers(cfg, self.real, self.device)
        if cfg.labels.mode in ("relabel", "projector"):
            resolve_topk(cfg.labels.relabel, self.real.num_classes)
        self.hello_base = None
        if cfg.labels.mode == "projector":  # HeLlO: refuse a wrong base / dead LoRA targets before compute
            self.hello_base = preflight(cfg.labels.projector, self.real)
        self.chunks = plan_chunks(cfg, self.real.num_classes)
        self.method_cls(self.opts, self.context())  # a method's own checks (e.g. BN teachers) run now
        self._check_existing()
        ensure_writable(self.root, "out_dir")

    def context(self) -> SynthContext:
        return SynthContext(self.real, self.by_class, self.teachers, self.mean.to(self.device),
                            self.std.to(self.device), self.device, self.cfg.ipc, self.cfg.seed)

    def _check_existing(self) -> None:
        """Refuse, before anything is written, a directory holding another recipe's artefact or
        another synthesis's chunks (any chunk in `work/`, also those this recipe's plan does not name)."""
        if (self.root / MANIFEST).is_file():
            m = read_manifest(self.root)
            if m.get("recipe_hash") != self.cfg.hash():
                raise ArtefactError(f"{self.root}: holds an artefact of another recipe (hash {m.get('recipe_hash')}, "
                                    f"this recipe {self.cfg.hash()}); choose another name/out_dir")
        for path in sorted((self.root / WORK).glob("*.safetensors")):
            self._check_chunk(path)

    def chunk_path(self, ch: Chunk) -> Path:
        return self.root / WORK / f"{ch.name}.safetensors"

    def _check_chunk(self, path: Path) -> None:
        meta = read_metadata(path)
        if meta.get("synthesis_hash") != self.cfg.synthesis_hash():
            raise ArtefactError(f"{path}: a chunk of another recipe (synthesis hash {meta.get('synthesis_hash')}, this "
                                f"recipe {self.cfg.synthesis_hash()}); choose another name/out_dir, or delete {self.root / WORK}")

    def chunk_done(self, ch: Chunk) -> bool:
        path = self.chunk_path(ch)
        if not path.is_file():
            return False
        self._check_chunk(path)
        return True

    def run_chunk(self, ch: Chunk) -> None:
        cfg = self.cfg
        start = time.perf_counter()
        gen = keyed_generator(cfg.seed, "chunk", ch.name)
        x0 = init_images(cfg.init, self.real, self.by_class, list(ch.classes), ch.ipc_lo, ch.ipc_hi, cfg.ipc,
                         cfg.seed, self.teachers, self.device, self.mean, self.std)
        if cfg.method == "none":  # the starting images are the distilled images (RDED, HeLlO)
            images, loss = x0, 0.0
        else:
            y = torch.tensor(ch.classes, device=self.device).repeat_interleave(ch.ipc_hi - ch.ipc_lo)
            method = self.method_cls(self.opts, self.context())
            images, loss = optimise(method, x0, y, self.context(), cfg.iterations, cfg.flip, gen,
                                    f"{cfg.name} {ch.name}", self.progress)
        seconds = time.perf_counter() - start
        save_tensors(self.chunk_path(ch), {"images": images.float().cpu()},
                     {"synthesis_hash": cfg.synthesis_hash(), "chunk": ch.name, "seconds": seconds, "final_loss": loss,
                      "classes": list(ch.classes), "ipc_range": [ch.ipc_lo, ch.ipc_hi]})

    def assemble(self) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, Any]]]:
        """Chunks → class-major images [C·IPC, ...] (no recomputation) and per-chunk timing."""
        ipc, n_cls = self.cfg.ipc, self.real.num_classes
        shape = (n_cls * ipc, self.real.channels, self.real.image_size, self.real.image_size)
        images = torch.empty(shape)
        timing = []
        for ch in self.chunks:
            tensors, meta = load_tensors(self.chunk_path(ch))
            x = tensors["images"]
            per = ch.ipc_hi - ch.ipc_lo
            if tuple(x.shape) != (ch.num_images, *shape[1:]):
                raise ArtefactError(f"{self.chunk_path(ch)}: holds {tuple(x.shape)}, want {(ch.num_images, *shape[1:])}")
            for k, c in enumerate(ch.classes):
                images[c * ipc + ch.ipc_lo:c * ipc + ch.ipc_hi] = x[k * per:(k + 1) * per]
            timing.append({"chunk": ch.name, "seconds": meta["seconds"], "final_loss": meta["final_loss"]})
        return images, torch.arange(n_cls).repeat_interleave(ipc), timing

    def wait_for_chunks(self, timeout: float, poll: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while not all(self.chunk_done(ch) for ch in self.chunks):
            if time.monotonic() > deadline:
                return False
            time.sleep(poll)
        return True

    def finalise(self, wait_seconds: float) -> dict[str, Any] | None:
        cfg = self.cfg
        relabel = cfg.labels.mode == "relabel"
        if not all(self.chunk_done(ch) for ch in self.chunks):
            # with relabel every rank joins the labelling once all images exist; otherwise the
            # last rank to finish merges alone
            if not (relabel and self.world > 1 and self.wait_for_chunks(wait_seconds)):
                return None
        images01, targets, timing = self.assemble()
        hello_info = {}
        if cfg.labels.mode == "projector":
            images01, hello_info = hello_step(cfg, self.real, self.teachers, self.hello_base, self.root, self.device,
                                              images01, targets)
        images = quantise(images01, cfg.storage)
        names = tuple(self.real.class_names)
        if relabel:
            store = relabel_store(self.root / "labels", as_imageset(images, targets, names), self.teachers,
                                  cfg.labels.relabel, cfg.seed, cfg.hash(), self.device, self.rank, self.world,
                                  self.progress)
            if store is None:
                return None
        total = sum(t["seconds"] for t in timing)
        info = {"recipe_hash": cfg.hash(), "name": cfg.name, "method": cfg.method, "flip": cfg.flip,
                "init": cfg.init.kind, "iterations": cfg.iterations, "label_mode": cfg.labels.mode,
                "teachers": teacher_records(cfg),
                "data": {"source": cfg.data.source, "path": str(cfg.data.path) if cfg.data.path else None,
                         "fingerprint": self.real.fingerprint(), "train_images": len(self.real)},
                "normalisation": {"mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()},
                "timing": {"seconds": total, "seconds_per_class": total / len(names), "chunks": timing,
                           "device": str(self.device)}, **hello_info}
        manifest = write_artefact(self.root, images, targets, names, cfg.ipc, dump_config(cfg), info, cfg.grid_scale)
        if not cfg.keep_work:  # the manifest is written: the chunks are no longer needed to resume
            shutil.rmtree(self.root / WORK, ignore_errors=True)
        return manifest


def synthesize(cfg: SynthConfig, rank: int | None = None, world: int | None = None,
               data: tuple[ImageSet, ImageSet] | None = None, progress: bool = True,
               wait_seconds: float = 24 * 3600) -> SynthResult:
    """Run this rank's missing chunks, then merge and write the artefact if every chunk is done."""
    rank, world = rank_world(rank, world)
    start = time.perf_counter()
    job = SynthJob(cfg, rank, world, data, progress)
    if (job.root / MANIFEST).is_file():
        return SynthResult(job.root, read_manifest(job.root), rank, world, 0.0, 0)
    mine = [ch for i, ch in enumerate(job.chunks) if i % world == rank]
    todo = [ch for ch in mine if not job.chunk_done(ch)]
    set_interval(cfg.log.every_seconds)
    bar = Progress(todo, desc=f"synth {cfg.name} rank {rank}/{world}", unit="chunk", enabled=progress)
    for ch in bar:
        job.run_chunk(ch)
    manifest = job.finalise(wait_seconds)
    return SynthResult(job.root, manifest, rank, world, time.perf_counter() - start, len(todo))
