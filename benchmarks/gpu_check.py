"""GPU check: the engine's CUDA and bf16 paths end to end, timed, printed as one table (≤ 5 min on one GPU).

Prepared to run the first time a GPU is available; on a machine without one, `--cpu --tiny` proves
that every row runs (tiny timm models, 32 px, a minute or so on two cores).

    benchmarks/gpu_check.sh                      # one GPU: resnet50 student, resnet152 teacher, 224 px, batch 128
    benchmarks/gpu_check.sh --cpu --tiny         # no GPU: test_resnet student, test_convnext teacher, 32 px
    benchmarks/gpu_check.sh --cpu                # the real models on the CPU (slow; small batch)
    benchmarks/gpu_check.sh --rows hard,plain_hard --batch 64      # a subset again, e.g. after a failure
  Without the repo's .venv (a bare GPU machine) the wrapper runs python3, after installing any wheels
  found in .whl/ outside the tree: the engine needs pydantic (+ pydantic-core, annotated-types,
  typing-inspection), the deepspeed row deepspeed and hjson, beside torch, timm, safetensors, PyYAML.
  options: --batch N  --size PX  --classes K  --precision fp32|bf16  --budget-seconds S (default 280; --tiny 100)
           --out PATH (default runs/gpu_check/results.json)  --rows KEY,KEY  --warmup N --windows N --steps N
           --profile KEY,KEY (torch.profiler tables of those rows beside --out: where the engine's time goes)

Rows (each guarded: a row that fails prints its error in the notes column and the check goes on; a row
that would run past --budget-seconds is stopped or skipped, so the whole check is bounded):
  hard            hard-label step: `students.build.create_step/create_backend` (backend plain), the run's
                  random crops (`distill.runner.training_views`), and the trainer's step
                  (`Trainer.train_step` where the trainer has it, else the same sequence written here):
                  batch to device → labeler → autocast forward → `.item()` of the terms → finite-loss check
                  → backward → finite-gradient check → optimiser step → finite-weights check
  kd_fp32         online KD (labels.source pool): `EnsemblePool` of one `teachers.teacher.Teacher`, fp32
  kd_bf16         the same teacher `configure("bf16", channels_last=True)`
  kd_compile      ... `configure("bf16", channels_last=True, compile=True)`; compiling is warm-up (its
                  time is in the notes)
  store           store replay: a label store written by `teachers.store.generate_store` (bf16 + channels_last
                  teacher, 1 crop per image, top-5 fp16) into a temporary directory, replayed through
                  labels.source store (`CyclicStoredLabeler`): no teacher in the timed step
  plain_hard      the same step as a hand-written torch loop: torch.autocast, model(x), F.cross_entropy,
                  loss.backward(), SGD step (same model, same batch; no crops, no checks)
  plain_kd        ... with the bf16 channels_last teacher under no_grad and soft cross-entropy
  deepspeed       `students.deepspeed_backend.DeepSpeedBackend`, configs/deepspeed/zero2.json, precision
                  bf16, one process (the backend sets the one-rank environment itself), hard labels
  eval            `students.accuracy.evaluate` over a synthetic uint8 `distill.data.ImageSet` (as the
                  trainer evaluates: forward in the run precision, eval batch 256)
  plain_hard_cl   reference: the plain hard step with the student in channels_last
  hard_cl         the engine's hard step with `data.loader.channels_last: true` (student and batch)
  deepspeed_cl    the deepspeed row with `data.loader.channels_last: true`: under DeepSpeed the batch only
                  (its weights stay contiguous), against the plain loop with a channels_last student
Columns: images/s (images the student trains on per second), ms/step, "vs plain" = engine ms/step ÷
plain-loop ms/step of the matching plain row (1.00: no overhead; the engine's includes what the notes
list), notes. Timing: warm-up steps excluded, `torch.cuda.synchronize` around every timed window,
the median of the windows. The table also goes to --out as JSON, with the device, torch/CUDA/cuDNN
versions and bf16 support. Exit status: 0 when every row ran, 1 when a row failed (the table and
JSON are written either way), 2 without a GPU and without --cpu.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the engine's packages without an install (a bare GPU machine's python3)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # DeepSpeed's CPU op

import torch  # noqa: E402  (after TORCH_EXTENSIONS_DIR)
import torch.nn.functional as F  # noqa: E402

PROFILES = {  # student, teacher, size, classes, batch, eval images, eval batch, warmup, windows, steps/window
    "gpu": dict(student="resnet50", teacher="resnet152", size=224, classes=1000, batch=128, eval_images=2048,
                eval_batch=256, warmup=5, windows=5, steps=4),
    "cpu": dict(student="resnet50", teacher="resnet152", size=224, classes=1000, batch=8, eval_images=64,
                eval_batch=32, warmup=2, windows=3, steps=2),
    "tiny": dict(student="test_resnet", teacher="test_convnext", size=32, classes=10, batch=16, eval_images=256,
                 eval_batch=64, warmup=2, windows=3, steps=3),
}
LR = 0.01  # throughput does not depend on it; small enough that random-label steps stay finite

# key, label, plain row it is compared with (None: no ratio)
TABLE = [
    ("hard", "hard-label step (engine, plain backend)", "plain_hard"),
    ("kd_fp32", "online KD, teacher fp32", None),
    ("kd_bf16", "online KD, teacher bf16 + channels_last", "plain_kd"),
    ("kd_compile", "online KD, teacher bf16 + channels_last + compile", "plain_kd"),
    ("store", "store replay step", "plain_hard"),
    ("plain_hard", "plain-loop hard step", None),
    ("plain_kd", "plain-loop KD step (teacher bf16 + channels_last)", None),
    ("deepspeed", "DeepSpeed ZeRO-2 bf16 hard step (1 process)", "plain_hard"),
    ("eval", "eval (students.accuracy.evaluate)", None),
    ("plain_hard_cl", "reference: plain-loop hard step, student channels_last", "plain_hard"),
    ("hard_cl", "hard-label step, data.loader.channels_last (student + batch)", "plain_hard_cl"),
    ("deepspeed_cl", "DeepSpeed ZeRO-2 bf16 hard step, data.loader.channels_last (batch only)", "plain_hard_cl"),
]
# the order they run in: compile last (slowest to start, the first to go when the budget runs out)
RUN_ORDER = ["hard", "plain_hard", "kd_fp32", "kd_bf16", "plain_kd", "store", "deepspeed", "eval", "plain_hard_cl",
             "hard_cl", "deepspeed_cl", "kd_compile"]


class BudgetExceeded(Exception):
    pass


def _alarm(signum, frame):
    raise BudgetExceeded("stopped: --budget-seconds ran out during this row")


@dataclass
class Row:
    key: str
    label: str
    images_per_s: float | None = None
    ms_per_step: float | None = None
    ratio: float | None = None
    windows: int = 0
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    seconds: float = 0.0


@dataclass
class Ctx:
    args: argparse.Namespace
    device: torch.device
    precision: str  # the student's (and the plain loops')
    train: Any  # ImageSet of uint8 images
    batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # CPU (images uint8, targets, index)
    deadline: float
    scratch: Path  # removed at the end
    results: dict[str, Row] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.precision]

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------- timing


def measure(ctx: Ctx, step: Callable[[int], None], images_per_step: int, row: Row) -> None:
    """Warm-up steps (excluded; the first one's time goes in the notes), then `windows` timed windows
    of `steps` steps each, synchronised; the median window sets images/s and ms/step."""
    a = ctx.args
    i = 0
    start = time.perf_counter()
    for w in range(a.warmup):
        step(i)
        i += 1
        if w == 0:
            ctx.sync()
            row.notes.append(f"first step {(time.perf_counter() - start) * 1e3:.0f} ms")
    ctx.sync()
    times = []
    for _ in range(a.windows):
        if times and time.monotonic() > ctx.deadline - 2:
            row.notes.append("fewer windows: budget")
            break
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step(i)
            i += 1
        ctx.sync()
        times.append((time.perf_counter() - t0) / a.steps)
    med = statistics.median(times)
    row.ms_per_step, row.images_per_s, row.windows = med * 1e3, images_per_step / med, len(times)
    if len(times) > 1:
        row.notes.append(f"spread {100 * (max(times) - min(times)) / med:.0f}%")
    if row.key in a.profile:
        profile(ctx, step, i, row)


def profile(ctx: Ctx, step: Callable[[int], None], i: int, row: Row) -> None:
    """`--profile ROW`: `steps` more steps under torch.profiler, after the timing (so it costs the
    timing nothing); the ops with the most self time, device first, go to profile_<row>.txt beside
    --out, with a Chrome trace (profile_<row>.json) — where a step's time goes beyond the model."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ctx.device.type == "cuda" else [])
    with torch_profile(activities=acts) as prof:
        for k in range(ctx.args.steps):
            step(i + k)
        ctx.sync()
    key = "self_cuda_time_total" if ctx.device.type == "cuda" else "self_cpu_time_total"
    out = ctx.args.out.parent / f"profile_{row.key}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"{row.label}: {ctx.args.steps} steps\n" + prof.key_averages().table(sort_by=key, row_limit=25) + "\n")
    prof.export_chrome_trace(str(out.with_suffix(".json")))
    row.notes.append(f"profile: {out.name}")


# ---------------------------------------------------------------- the engine's pieces


def recipe(ctx: Ctx, **over) -> Any:
    """A RunConfig through `distill.recipe.parse_config` (every registry checked), for synthetic data."""
    from distill.recipe import parse_config

    a = ctx.args
    raw = {"name": "gpu_check", "seed": 0, "device": ctx.device.type, "precision": ctx.precision,
           "out_dir": str(ctx.scratch / "runs"),
           "data": {"source": "digits", "image_size": a.size}, "student": {"model": a.student},
           "optim": {"name": "sgd", "lr": LR}, "trainer": {"epochs": 1, "batch_size": a.batch}}
    for k, v in over.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) else v
    return parse_config(raw, "gpu_check")


def weights_finite(module: torch.nn.Module) -> bool:
    """`students.trainer.Trainer.weights_finite`, on a module (the trainer checks after every step)."""
    return bool(torch.isfinite(torch.stack([torch.linalg.vector_norm(p.detach().float())
                                            for p in module.parameters()])).all())


def engine_step(ctx: Ctx, cfg, backend, step_module, labeler) -> Callable[[int], None]:
    """One step as the trainer runs it (grad_accum 1): `students.trainer.Trainer.train_step` where the
    trainer has it, else the same sequence as `Trainer.train_epoch`'s loop body."""
    import inspect

    from students.trainer import Trainer

    gen = torch.Generator().manual_seed(0)
    dev = backend.device
    own = getattr(Trainer, "train_step", None)
    if own is not None and list(inspect.signature(own).parameters) == ["self", "epoch", "gen", "images", "targets",
                                                                        "index"]:
        run_dir = Path(tempfile.mkdtemp(prefix="run_", dir=ctx.scratch))  # the step log writes nothing unless due
        trainer = Trainer(cfg, step_module, backend, ctx.train, ctx.train, labeler, run_dir)
        trainer.steps.enabled = False

        def trainer_step(i: int) -> None:
            images, targets, index = ctx.batches[i % len(ctx.batches)]
            if trainer.train_step(0, gen, images, targets, index) is None:
                raise FloatingPointError(f"step {i} skipped: non-finite loss or gradient")

        trainer_step.via = "Trainer.train_step"
        return trainer_step

    def run(i: int) -> None:
        images, targets, index = ctx.batches[i % len(ctx.batches)]
        images, targets = images.to(dev, non_blocking=True).float().div_(255), targets.to(dev)
        batch = labeler(images, targets, index, 0, gen)
        with backend.autocast():
            terms = backend.module(batch.images, batch.targets, batch.soft)
        values = {k: v.item() for k, v in terms.items()}
        if backend.reduce_sum(0.0 if all(map(math.isfinite, values.values())) else 1.0):
            raise FloatingPointError(f"non-finite loss at step {i}: {values}")
        backend.backward(terms["loss"])
        if not backend.grads_finite():
            raise FloatingPointError(f"non-finite gradient at step {i}")
        backend.step()
        if not weights_finite(step_module):
            raise FloatingPointError(f"non-finite weight after step {i}")

    run.via = "the trainer's sequence"
    return run


def student_backend(ctx: Ctx, cfg) -> tuple[Any, Any]:
    from students.build import create_backend, create_step

    step = create_step(cfg, ctx.train)
    return step, create_backend(cfg, step, ctx.device)


def online_labeler(ctx: Ctx, cfg, backend, source) -> Any:
    """`labels.source` hard (source None) or pool, built as `distill.runner.train` builds it."""
    from distill.runner import training_views
    from teachers.labeling import LabelContext, create_labeling

    name = "hard" if source is None else "pool"
    return create_labeling(name).build(LabelContext(ctx.train, ctx.device, training_views(cfg, backend),
                                                    pool=(lambda: source), run=cfg))


def make_teacher(ctx: Ctx, precision: str, channels_last: bool, compile: bool):
    """`teachers.teacher.create_teacher` (random init: no download) + `configure`, on the device."""
    from distill.config import ModelConfig
    from teachers.teacher import create_teacher

    a = ctx.args
    torch.manual_seed(1)
    t = create_teacher(ModelConfig(model=a.teacher), a.classes, 3, a.size, ctx.train.class_names)
    return t.configure(precision, channels_last, compile).to(ctx.device)


def make_pool(ctx: Ctx, cfg, teacher):
    from teachers.pool import EnsemblePool

    return EnsemblePool([teacher], temperature=cfg.loss.temperature).to(ctx.device)


def teacher_note(labeler, steps: int) -> str:
    cost = labeler.cost
    if not cost.total_queries:
        return ""
    return f"teacher {1e3 * cost.total_seconds / max(steps, 1):.1f} ms/step (pool's own timing)"


# ---------------------------------------------------------------- rows


def row_hard_cl(ctx: Ctx, row: Row) -> None:
    """The engine's hard step with `data.loader.channels_last`: student weights and batch channels_last."""
    cfg = recipe(ctx, data={"loader": {"channels_last": True}})
    step, backend = student_backend(ctx, cfg)
    run = engine_step(ctx, cfg, backend, step, online_labeler(ctx, cfg, backend, None))
    measure(ctx, run, ctx.args.batch, row)
    row.notes.append(f"step: {run.via}")


def row_hard(ctx: Ctx, row: Row) -> None:
    cfg = recipe(ctx)
    step, backend = student_backend(ctx, cfg)
    labeler = online_labeler(ctx, cfg, backend, None)
    run = engine_step(ctx, cfg, backend, step, labeler)
    measure(ctx, run, ctx.args.batch, row)
    row.notes.append(f"step: {run.via}")
    # what the engine does beyond the plain loop, measured alone: the on-device random crops
    gen, x = torch.Generator().manual_seed(0), ctx.batches[0][0].to(ctx.device).float().div_(255)
    labeler.views(x, gen)
    ctx.sync()
    t0 = time.perf_counter()
    for _ in range(5):
        labeler.views(x, gen)
    ctx.sync()
    row.notes.append(f"crops {(time.perf_counter() - t0) / 5 * 1e3:.1f} ms/step")
    row.notes.append("includes crops, .item() of the terms, loss/grad/weight finite checks")


def _kd(ctx: Ctx, row: Row, precision: str, channels_last: bool, compile: bool) -> None:
    cfg = recipe(ctx)
    step, backend = student_backend(ctx, cfg)
    teacher = make_teacher(ctx, precision, channels_last, compile)
    labeler = online_labeler(ctx, cfg, backend, make_pool(ctx, cfg, teacher))
    run = engine_step(ctx, cfg, backend, step, labeler)
    a = ctx.args
    counted = {"n": 0}

    def timed(i: int) -> None:
        if i == a.warmup:  # the pool's own timing, over the timed windows only
            labeler.cost.seconds.clear()
            labeler.cost.queries.clear()
            counted["n"] = 0
        run(i)
        counted["n"] += 1

    measure(ctx, timed, a.batch, row)
    row.notes.append(teacher_note(labeler, counted["n"]))
    if compile:
        row.notes.append("first step = compile")


def row_kd_fp32(ctx: Ctx, row: Row) -> None:
    _kd(ctx, row, "fp32", False, False)


def row_kd_bf16(ctx: Ctx, row: Row) -> None:
    _kd(ctx, row, "bf16", True, False)


def row_kd_compile(ctx: Ctx, row: Row) -> None:
    _kd(ctx, row, "bf16", True, True)


def row_store(ctx: Ctx, row: Row) -> None:
    from distill.runner import training_views
    from teachers.labeling import LabelContext, create_labeling
    from teachers.store import StoreSpec, generate_store

    a, train = ctx.args, ctx.train
    cfg = recipe(ctx)
    aug = cfg.data.augment
    root = ctx.scratch / "store"
    spec = StoreSpec(config_hash="gpu_check", label_source="gpu_check teacher", teachers=(a.teacher,),
                     class_names=tuple(train.class_names), data_fingerprint=train.fingerprint(),
                     image_size=train.image_size, num_images=len(train), epochs=1, crops_per_image=1,
                     topk=min(5, a.classes), shard_images=len(train), seed=0, scale=tuple(aug.scale),
                     ratio=tuple(aug.ratio), flip_prob=0.5 if aug.flip else 0.0)
    teacher = make_teacher(ctx, "bf16", True, False)
    t0 = time.perf_counter()
    manifest = generate_store(root, spec, train, make_pool(ctx, cfg, teacher), ctx.device, batch_size=a.batch,
                              progress=False)
    ctx.sync()
    gen_s = time.perf_counter() - t0
    del teacher
    free(ctx)
    step, backend = student_backend(ctx, cfg)
    labeler = create_labeling("store", {"store": str(root)}).build(
        LabelContext(train, ctx.device, training_views(cfg, backend), run=cfg))
    measure(ctx, engine_step(ctx, cfg, backend, step, labeler), a.batch, row)
    row.notes.append(f"store of {len(train)} images written in {gen_s:.1f} s ({manifest['bytes'] / 1e3:.0f} kB), "
                     f"1 stored crop/image, top-{spec.topk} fp16")


def _plain(ctx: Ctx, row: Row, kd: bool, channels_last: bool = False) -> None:
    """The step as a plain torch loop would write it, on the same model, batch and precision."""
    from distill.models import create_model

    a, dev, dtype = ctx.args, ctx.device, ctx.dtype
    cast = dtype != torch.float32
    torch.manual_seed(0)
    model = create_model(a.student, a.classes, 3, a.size, ctx.train.class_names).to(dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    teacher = None
    if kd:
        torch.manual_seed(1)
        teacher = create_model(a.teacher, a.classes, 3, a.size, ctx.train.class_names)
        teacher = teacher.eval().requires_grad_(False).to(dev, memory_format=torch.channels_last)
    model.train()

    def run(i: int) -> None:
        images, targets, _ = ctx.batches[i % len(ctx.batches)]
        x, y = images.to(dev, non_blocking=True).float().div_(255), targets.to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if teacher is not None:
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
                p = F.softmax(teacher(x.contiguous(memory_format=torch.channels_last)).float(), 1)
        with torch.autocast(dev.type, dtype=dtype, enabled=cast):
            logits = model(x)
        if teacher is not None:
            loss = -(p * F.log_softmax(logits.float(), 1)).sum(1).mean()
        else:
            loss = F.cross_entropy(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    measure(ctx, run, a.batch, row)


def row_plain_hard(ctx: Ctx, row: Row) -> None:
    _plain(ctx, row, kd=False)


def row_plain_kd(ctx: Ctx, row: Row) -> None:
    _plain(ctx, row, kd=True)


def row_plain_hard_cl(ctx: Ctx, row: Row) -> None:
    _plain(ctx, row, kd=False, channels_last=True)


def row_deepspeed(ctx: Ctx, row: Row) -> None:
    _deepspeed(ctx, row, channels_last=False)


def row_deepspeed_cl(ctx: Ctx, row: Row) -> None:
    _deepspeed(ctx, row, channels_last=True)


def _deepspeed(ctx: Ctx, row: Row, channels_last: bool) -> None:
    if ctx.device.type == "cuda" and os.environ.get("DS_ACCELERATOR", "cuda") == "cpu":
        raise RuntimeError("DS_ACCELERATOR=cpu in the environment on a GPU run; unset it (gpu_check.sh does)")
    cfg = recipe(ctx, precision="bf16", data={"loader": {"channels_last": channels_last}},
                 trainer={"backend": "deepspeed", "deepspeed": str(ROOT / "configs" / "deepspeed" / "zero2.json")})
    t0 = time.perf_counter()
    step, backend = student_backend(ctx, cfg)
    init_s = time.perf_counter() - t0
    labeler = online_labeler(ctx, cfg, backend, None)
    measure(ctx, engine_step(ctx, cfg, backend, step, labeler), ctx.args.batch, row)
    import deepspeed

    stage = backend.config["zero_optimization"]["stage"]
    row.notes.append(f"deepspeed {deepspeed.__version__}, ZeRO {stage}, world {backend.world_size}, "
                     f"init {init_s:.1f} s")
    if ctx.precision != "bf16":
        row.notes.append(f"ratio against a {ctx.precision} plain loop")


def row_eval(ctx: Ctx, row: Row) -> None:
    from distill.data import ImageSet
    from distill.models import create_model
    from students.accuracy import evaluate

    a = ctx.args
    g = torch.Generator().manual_seed(2)
    data = ImageSet(torch.randint(0, 256, (a.eval_images, 3, a.size, a.size), dtype=torch.uint8, generator=g),
                    torch.randint(0, a.classes, (a.eval_images,), generator=g), ctx.train.class_names)
    torch.manual_seed(0)
    model = create_model(a.student, a.classes, 3, a.size, ctx.train.class_names).to(ctx.device)
    saved = a.warmup, a.windows, a.steps
    a.warmup, a.windows, a.steps = 1, max(3, min(a.windows, 5)), 1  # one step = one pass over the eval set
    try:
        measure(ctx, lambda i: evaluate(model, data, a.eval_batch, ctx.device, precision=ctx.precision),
                a.eval_images, row)
    finally:
        a.warmup, a.windows, a.steps = saved
    batches = math.ceil(a.eval_images / a.eval_batch)
    row.ms_per_step = row.ms_per_step / batches  # per eval batch
    row.notes.append(f"{a.eval_images} images, ms per batch of {a.eval_batch}; forward in {ctx.precision} (autocast)")


ROWS: dict[str, Callable[[Ctx, Row], None]] = {
    "hard": row_hard, "kd_fp32": row_kd_fp32, "kd_bf16": row_kd_bf16, "kd_compile": row_kd_compile,
    "store": row_store, "plain_hard": row_plain_hard, "plain_kd": row_plain_kd, "deepspeed": row_deepspeed,
    "eval": row_eval, "plain_hard_cl": row_plain_hard_cl, "hard_cl": row_hard_cl, "deepspeed_cl": row_deepspeed_cl,
}


# ---------------------------------------------------------------- running, reporting


def free(ctx: Ctx) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def run_row(ctx: Ctx, key: str, label: str) -> Row:
    row = Row(key, label)
    remaining = ctx.deadline - time.monotonic()
    if remaining < 3:
        row.error = f"skipped: --budget-seconds {ctx.args.budget_seconds:g} ran out before this row"
        return row
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, remaining)
    try:
        ROWS[key](ctx, row)
    except BudgetExceeded as err:
        row.error = str(err)
    except Exception as err:  # noqa: BLE001  (a row's failure is reported, and the check goes on)
        msg = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        if time.monotonic() >= ctx.deadline:  # the alarm, wrapped by a library (e.g. torch.compile's)
            msg = f"stopped: --budget-seconds ran out during this row ({msg})"
        row.error = msg
        row.notes.append("traceback in the JSON")
        row.traceback = traceback.format_exc(limit=12)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        row.seconds = time.perf_counter() - start
        if ctx.device.type == "cuda":
            with contextlib.suppress(Exception):
                row.notes.append(f"peak {torch.cuda.max_memory_allocated(ctx.device) / 2**30:.1f} GiB")
        free(ctx)
    return row


def _get(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as err:  # noqa: BLE001  (a version query that fails is reported, not fatal)
        return f"? ({type(err).__name__})"


def environment(device: torch.device, precision: str) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda_build": torch.version.cuda, "precision": precision,
                           "host": platform.node(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env |= {"device": torch.cuda.get_device_name(device), "capability": f"{p.major}.{p.minor}",
                "gpu_memory_gib": round(p.total_memory / 2**30, 1),
                "cudnn": _get(torch.backends.cudnn.version),
                "bf16_supported": _get(torch.cuda.is_bf16_supported), "driver_cuda": _driver_cuda(),
                "cudnn_benchmark": _get(lambda: torch.backends.cudnn.benchmark),
                "tf32_conv": _get(lambda: torch.backends.cudnn.allow_tf32),
                "tf32_matmul": _get(lambda: torch.backends.cuda.matmul.allow_tf32)}
    else:
        env |= {"device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                "bf16_supported": True, "note": "bf16 on the CPU: autocast through oneDNN (slow, a path check)"}
    for mod in ("timm", "deepspeed"):
        env[mod] = _get(lambda: __import__(mod).__version__)
    return env


def _driver_cuda() -> str | None:
    with contextlib.suppress(Exception):
        v = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        if v:
            return f"{v // 1000}.{v % 1000 // 10}"
    return None


def fmt(v: float | None, spec: str, width: int) -> str:
    return f"{'-' if v is None else format(v, spec):>{width}}"


def print_table(ctx: Ctx, env: dict[str, Any], rows: list[Row], total: float) -> None:
    a = ctx.args
    print(f"\n# gpu_check: {env['device']} | torch {env['torch']} (CUDA {env['cuda_build']}"
          + (f", cuDNN {env.get('cudnn')}, driver CUDA {env.get('driver_cuda')}" if ctx.device.type == "cuda" else "")
          + f") | bf16 supported: {env['bf16_supported']} | deepspeed {env.get('deepspeed', '-')}, "
            f"timm {env.get('timm', '-')}")
    print(f"# student {a.student}, teacher {a.teacher}, {a.size} px, {a.classes} classes, batch {a.batch}, "
          f"student precision {ctx.precision}; warm-up {a.warmup}, median of {a.windows} windows × {a.steps} steps; "
          f"total {total:.0f} s (budget {a.budget_seconds:g} s)")
    w = max(len(r.label) for r in rows)
    head = f"{'row':<{w}}  {'images/s':>9}  {'ms/step':>8}  {'vs plain':>8}  notes"
    print(head)
    print("-" * len(head))
    for r in rows:
        notes = "; ".join(n for n in r.notes if n)
        if r.error:
            notes = f"FAILED {r.error[:160]}" + (f" ({notes})" if notes else "")
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}x"
        print(f"{r.label:<{w}}  {fmt(r.images_per_s, '.1f', 9)}  {fmt(r.ms_per_step, '.1f', 8)}  {ratio:>8}  {notes}")
    print("vs plain: engine ms/step ÷ the matching plain loop's (hard, store, deepspeed, reference: plain-loop hard "
          "step; KD: plain-loop KD step)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--cpu", action="store_true", help="run on the CPU (no GPU here)")
    p.add_argument("--tiny", action="store_true", help="tiny timm models, 32 px, few steps (with --cpu: a path check)")
    p.add_argument("--student"), p.add_argument("--teacher")
    for k in ("size", "classes", "batch", "eval-images", "eval-batch", "warmup", "windows", "steps"):
        p.add_argument(f"--{k}", type=int)
    p.add_argument("--precision", choices=("fp32", "bf16"), help="the student's (default bf16 where supported)")
    p.add_argument("--budget-seconds", type=float, help="bound on the whole check (default 280; --tiny 100)")
    p.add_argument("--rows", help=f"comma-separated subset of: {', '.join(k for k, _, _ in TABLE)}")
    p.add_argument("--profile", default=[], type=lambda v: [k.strip() for k in v.split(",") if k.strip()],
                   help="rows to profile after timing them (torch.profiler; tables beside --out), e.g. hard,plain_hard")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu_check" / "results.json")
    a = p.parse_args()
    started = time.monotonic()
    profile = PROFILES["tiny" if a.tiny else "cpu" if a.cpu else "gpu"]
    if a.budget_seconds is None:  # --tiny: bounded well under 2 minutes on a shared 2-core machine
        a.budget_seconds = 100.0 if a.tiny else 280.0
    for k, v in profile.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    keys = [k for k, _, _ in TABLE]
    wanted = keys if not a.rows else [k.strip() for k in a.rows.split(",") if k.strip()]
    unknown = [k for k in wanted if k not in keys]
    if unknown:
        p.error(f"--rows {unknown}: unknown; allowed: {', '.join(keys)}")

    if a.cpu:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        print("gpu_check: no CUDA device is visible here; run `benchmarks/gpu_check.sh --cpu --tiny` to check the "
              "paths on the CPU", file=sys.stderr)
        return 2
    from distill.data import ImageSet
    from distill.distributed import check_precision

    bf16_ok = device.type == "cpu" or torch.cuda.is_bf16_supported()
    precision = a.precision or ("bf16" if bf16_ok else "fp32")
    check_precision(precision, device)  # the engine's own refusal (bf16 on a GPU without it)

    # synthetic data: uint8 images in memory, as `distill.data` serves them; two batches, cycled
    n = 2 * a.batch
    g = torch.Generator().manual_seed(0)
    names = tuple(str(i) for i in range(a.classes))
    train = ImageSet(torch.randint(0, 256, (n, 3, a.size, a.size), dtype=torch.uint8, generator=g),
                     torch.randint(0, a.classes, (n,), generator=g), names)
    batches = [(train.images[i:i + a.batch], train.targets[i:i + a.batch], torch.arange(i, i + a.batch))
               for i in range(0, n, a.batch)]
    ctx = Ctx(a, device, precision, train, batches, deadline=started + a.budget_seconds,
              scratch=Path(tempfile.mkdtemp(prefix="gpu_check_")))
    env = environment(device, precision)
    print(f"gpu_check on {env['device']}: rows {', '.join(k for k in RUN_ORDER if k in wanted)}", flush=True)

    labels = {k: lbl for k, lbl, _ in TABLE}
    for key in RUN_ORDER:
        if key not in wanted:
            continue
        row = run_row(ctx, key, labels[key])
        ctx.results[key] = row
        status = (f"FAILED {row.error}" if row.error else
                  f"{row.images_per_s:.1f} images/s, {row.ms_per_step:.1f} ms/step")
        print(f"  {key:<14} {row.seconds:6.1f} s  {status}", flush=True)

    rows = []
    for key, _, vs in TABLE:
        if key not in ctx.results:
            continue
        r = ctx.results[key]
        base = ctx.results.get(vs) if vs else None
        if r.ms_per_step is not None and base is not None and base.ms_per_step:
            r.ratio = r.ms_per_step / base.ms_per_step
        rows.append(r)
    total = time.monotonic() - started
    print_table(ctx, env, rows, total)

    out = {"environment": env, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
           "total_seconds": total,
           "rows": [{"key": r.key, "row": r.label, "images_per_s": r.images_per_s, "ms_per_step": r.ms_per_step,
                     "vs_plain": r.ratio, "vs": dict((k, v) for k, _, v in TABLE)[r.key], "windows": r.windows,
                     "seconds": r.seconds, "notes": [n for n in r.notes if n], "error": r.error,
                     "traceback": r.traceback} for r in rows]}
    shutil.rmtree(ctx.scratch, ignore_errors=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1))
    print(f"written {a.out}")
    return 1 if any(r.error for r in rows) else 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # not a normal interpreter exit: a one-rank DeepSpeed process group and torch.compile's worker pool
    # can hold teardown up; everything has been printed and written by now
    os._exit(code)
