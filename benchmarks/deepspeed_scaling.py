"""DeepSpeed on this machine (CPU, gloo): what ZeRO saves per rank, and what a second process buys.

Part 1 (memory, 2 ranks under torchrun): per rank, for ZeRO 0 / 1 / 2 (configs/deepspeed/) and each
  recipe optimiser (SGD momentum, AdamW), bytes of optimiser state (momentum / Adam moments), of
  DeepSpeed's fp32 master partition, of gradients held at the accumulation boundary, and of all
  live CPU tensors (params, DeepSpeed buffers included) mid-accumulation (grad_accum 2) and after
  a step. Printed as ratios to ZeRO 0. Expected with N ranks: state and grads / N, plus an fp32
  master copy / N (DeepSpeed keeps one even when the weights are fp32).
Part 2 (throughput): the same recipe (global batch 64) trained by `distill train` (plain, 1
  process) and `distill launch --nproc 1|2` (DeepSpeed ZeRO 0 and 2), images/s of the last epoch.
  One CPU thread per process (OMP_NUM_THREADS=1), as one GPU per rank: ideal 2 / 1 is 2.0x.

    .venv/bin/python benchmarks/deepspeed_scaling.py [--quick] [--data ../shared/data/mnist10k.npz]

Measures; asserts nothing. The first DeepSpeed start on a machine JIT-compiles a C++ op (once, cached
in TORCH_EXTENSIONS_DIR, default the repo's .cache/torch_extensions).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STAGES = (0, 1, 2)
OPTIMS = ("sgd", "adamw")


# ---------------------------------------------------------------- part 1: a torchrun worker


def _live_tensor_bytes() -> int:
    import torch

    seen: dict[int, int] = {}
    for o in gc.get_objects():
        if isinstance(o, torch.Tensor) and o.device.type == "cpu":
            s = o.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _nbytes(tensors) -> int:
    import torch

    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and t.dim() > 0)


def memory_worker(model: str, size: int, out: Path) -> None:
    """One rank: for each optimiser and ZeRO stage, a DeepSpeedBackend on `model`, two optimiser
    steps of grad_accum 2 on random images, byte counts after each phase."""
    import torch

    from distill.config import LossConfig, OptimConfig, TrainerConfig
    from distill.deepspeed_config import read_deepspeed_config
    from distill.models import create_model
    from students.deepspeed_backend import DeepSpeedBackend
    from students.step import DistillStep

    rows = []
    for optim in OPTIMS:
        for stage in STAGES:
            gc.collect()
            before = _live_tensor_bytes()
            torch.manual_seed(0)
            step = DistillStep(create_model(model, 10, 1, size, tuple(map(str, range(10)))), LossConfig())
            ds = read_deepspeed_config(ROOT / "configs" / "deepspeed" / f"zero{stage}.json")
            trainer = TrainerConfig(backend="deepspeed", deepspeed=ds, batch_size=8, grad_accum=2)
            b = DeepSpeedBackend(step, step.param_groups(0.01), OptimConfig(name=optim), "fp32", torch.device("cpu"),
                                 trainer=trainer)
            zero = b.optimizer
            base = getattr(zero, "optimizer", zero)  # ZeRO wraps the client optimiser

            def grads() -> int:
                held = _nbytes(p.grad for p in step.parameters() if p.grad is not None)
                avg = getattr(zero, "averaged_gradients", None) or {}
                part = getattr(zero, "grads_in_partition", None)  # ZeRO 2 contiguous_gradients buffer
                part = part if isinstance(part, list) else [part]
                return (held + _nbytes(t for v in avg.values() if v is not None for t in v) + _nbytes(part))

            rec = {"optim": optim, "stage": stage, "params": _nbytes(step.parameters())}
            for micro in range(4):  # two optimiser steps of two micro-steps
                x, y = torch.rand(2, 1, size, size), torch.randint(0, 10, (2,))
                b.backward(b.module(x, y, None)["loss"])
                if micro == 2:
                    gc.collect()
                    rec["live_mid_accum"] = _live_tensor_bytes() - before
                if micro == 3:
                    rec["grads_boundary"] = grads()
                b.step()
            rec["optimizer_state"] = _nbytes(v for s in base.state.values() for v in s.values())
            rec["fp32_master"] = _nbytes(getattr(zero, "single_partition_of_fp32_groups", []))
            gc.collect()
            rec["live_after_step"] = _live_tensor_bytes() - before
            rows.append(rec)
            del b, step, zero, base
            gc.collect()
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    if torch.distributed.get_rank() == 0:
        out.write_text(json.dumps(gathered))


def run_memory(args, env) -> list[list[dict]]:
    out = args.out / "memory.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", __file__,
           "--memory-worker", "--model", args.model, "--size", str(args.size), "--out", str(args.out)]
    r = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"memory worker failed:\n{r.stderr[-4000:]}")
    return json.loads(out.read_text())


def print_memory(per_rank: list[list[dict]], model: str) -> None:
    mb = 1e6
    print(f"\n## Part 1: per-rank memory, {model}, 2 ranks, fp32, grad_accum 2 (MB; rank 0, ratio to ZeRO 0)")
    cols = ["optimizer_state", "fp32_master", "grads_boundary", "live_mid_accum", "live_after_step"]
    print(f"{'optim':6} {'ZeRO':>4} " + " ".join(f"{c:>22}" for c in cols) + f" {'state+master / Z0':>18}")
    for optim in OPTIMS:
        rows = {r["stage"]: r for r in per_rank[0] if r["optim"] == optim}
        z0 = rows[0]
        for s in STAGES:
            r = rows[s]
            cells = [f"{r[c] / mb:9.1f} ({r[c] / z0[c]:4.2f}x)" if z0[c] else f"{r[c] / mb:9.1f}       " for c in cols]
            both = (r["optimizer_state"] + r["fp32_master"]) / (z0["optimizer_state"] + z0["fp32_master"])
            print(f"{optim:6} {s:>4} " + " ".join(f"{c:>22}" for c in cells) + f" {both:17.2f}x")
    spread = max(abs(a["optimizer_state"] - b["optimizer_state"]) for a, b in zip(per_rank[0], per_rank[1]))
    print(f"(params {per_rank[0][0]['params'] / mb:.1f} MB per rank; rank 0 vs rank 1 optimizer state differ by at "
          f"most {spread / mb:.3f} MB; live_* count every live CPU tensor: params, grads, state, DeepSpeed buffers)")


# ---------------------------------------------------------------- part 2: throughput via the CLI


def run_throughput(args, env) -> list[dict]:
    recipe = {"name": "bench", "seed": 0, "out_dir": str(args.out / "runs"),
              "data": {"source": "npz", "path": str(args.data), "image_size": args.size, "train_limit": args.images},
              "student": {"model": args.model}, "optim": {"name": "sgd", "lr": 0.05},
              "trainer": {"epochs": 2, "batch_size": 64, "eval_batch_size": 512}}
    path = args.out / "recipe.yaml"
    import shutil

    import yaml

    shutil.rmtree(args.out / "runs", ignore_errors=True)  # fresh runs, not resumed ones

    path.write_text(yaml.safe_dump(recipe))
    variants = [("plain", 1, None), ("zero0", 1, 0), ("zero0", 2, 0), ("zero2", 1, 2), ("zero2", 2, 2)]
    rows = []
    for label, nproc, stage in variants:
        name = f"{label}_n{nproc}"
        over = [f"name={name}"]
        if stage is None:
            cmd = [sys.executable, "-m", "distill.cli", "train", str(path), *over]
        else:
            over += ["trainer.backend=deepspeed", f"trainer.deepspeed=configs/deepspeed/zero{stage}.json"]
            cmd = [sys.executable, "-m", "distill.cli", "launch", "--nproc", str(nproc), str(path), *over]
        start = time.perf_counter()
        r = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": "1"}, cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"{name} failed:\n{r.stderr[-4000:]}")
        last = [json.loads(x) for x in (args.out / "runs" / name / "metrics.jsonl").read_text().splitlines()][-1]
        rows.append({"run": f"{label} × {nproc}", "procs": nproc, "stage": stage, "img_s": last["images_per_second"],
                     "top1": last["test_top1"], "wall": time.perf_counter() - start})
    return rows


def print_throughput(rows: list[dict], args) -> None:
    print(f"\n## Part 2: throughput, {args.model} at {args.size} px, global batch 64, {args.images} images/epoch, "
          f"1 thread per process, {os.cpu_count()} cores, last epoch")
    print(f"{'run':12} {'images/s':>10} {'vs plain':>9} {'test top-1':>11} {'wall s':>8}")
    plain = rows[0]["img_s"]
    for r in rows:
        print(f"{r['run']:12} {r['img_s']:10.1f} {r['img_s'] / plain:8.2f}x {r['top1']:10.2f}% {r['wall']:8.1f}")
    by = {(r["stage"], r["procs"]): r["img_s"] for r in rows if r["stage"] is not None}
    for s in (0, 2):
        print(f"ZeRO {s}: 2 processes / 1 process at equal global batch = {by[(s, 2)] / by[(s, 1)]:.2f}x")
    print("(1 and 2 processes train on the same images and crops; top-1 still differs where the model has BatchNorm,\n"
          " which normalises over each rank's share of the batch, and by float summation order. The cores are shared\n"
          " with whatever else runs on the machine: a second process only helps when a core is idle.)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller model and data (a few minutes)")
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "mnist10k.npz")
    p.add_argument("--model", default=None, help="student (default resnet18; --quick test_resnet)")
    p.add_argument("--size", type=int, default=28)
    p.add_argument("--images", type=int, default=None, help="training images per epoch (default 4096; quick 1024)")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_deepspeed")
    p.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.model = args.model or ("test_resnet" if args.quick else "resnet18")
    args.images = args.images or (1024 if args.quick else 4096)
    if args.memory_worker:
        memory_worker(args.model, args.size, args.out / "memory.json")
        return
    if not args.data.is_file():
        sys.exit(f"--data {args.data}: no such file (an .npz with train/test images)")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))}
    args.out = args.out.resolve()
    print(f"# DeepSpeed scaling: {args.model}, CPU ({os.cpu_count()} cores), DS_ACCELERATOR=cpu, gloo")
    print_memory(run_memory(args, env), args.model)
    print_throughput(run_throughput(args, env), args)


if __name__ == "__main__":
    main()
