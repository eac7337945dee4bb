"""KD overhead and MEAL V2 accuracy.

Part 1 (timing, one run, interleaved so machine load hits every variant alike): per batch,
  (a) a student step on hard labels, (b) each teacher's inference, (c) a MEAL V2 ensemble-KD step
  (teachers + student step + discriminator). Prints (c) / ((a) + Σ(b)): the cost of distillation
  beyond the work it cannot avoid (goal ≤ 1.05).
Part 2 (accuracy): the demo pipeline on an .npz dataset (default ../shared/data/mnist10k.npz):
  teachers, then the student with hard labels / best single teacher / MEAL V2 ensemble.

    .venv/bin/python benchmarks/kd_overhead.py [--data PATH] [--epochs N] [--skip-accuracy]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from distill.config import LossConfig, OptimConfig
from distill.models import create_model
from students.backends import PlainBackend
from students.step import DistillStep
from teachers import EnsemblePool, Teacher

ROOT = Path(__file__).resolve().parent.parent
NAMES = tuple(str(i) for i in range(10))


def time_steps(student_arch: str, teacher_archs: list[str], batch: int, size: int, repeats: int) -> dict:
    torch.manual_seed(0)
    x = torch.rand(batch, 1, size, size)
    y = torch.randint(0, 10, (batch,))
    teachers = [Teacher(f"{a}#{i}", create_model(a, 10, 1, size, NAMES)) for i, a in enumerate(teacher_archs)]
    pool = EnsemblePool(teachers)

    def make(loss: LossConfig):
        step = DistillStep(create_model(student_arch, 10, 1, size, NAMES), loss)
        return PlainBackend(step, step.param_groups(0.01), OptimConfig(), "fp32", torch.device("cpu"))

    hard = make(LossConfig())
    meal = make(LossConfig(discriminator="joint"))

    def hard_step():
        hard.backward(hard.module(x, y, None)["loss"])
        hard.step()

    def meal_step():
        soft = pool.soft_labels(x)
        meal.backward(meal.module(x, y, soft)["loss"])
        meal.step()

    fns = {"a_student_hard": hard_step, "c_meal_v2_step": meal_step}
    for t in teachers:
        fns[f"b_teacher_{t.name}"] = (lambda t=t: t.logits(x))
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 2):
        for k, fn in fns.items():  # interleaved: load changes hit every variant
            start = time.perf_counter()
            fn()
            if r >= 2:  # warm-up
                times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def accuracy(data: Path, epochs: int, out: Path) -> None:
    from distill.demo import run_demo

    # the demo recipes, on another dataset: the same code path a user runs
    recipes = out / "recipes"
    recipes.mkdir(parents=True, exist_ok=True)
    for src in (ROOT / "configs" / "demo").glob("*.yaml"):
        if src.name.startswith(("teacher_", "student_")):
            text = src.read_text().replace("data: {source: digits, image_size: 32}",
                                           f"data: {{source: npz, path: {data}, image_size: 32}}")
            text = text.replace("epochs: 15", f"epochs: {epochs}")
            (recipes / src.name).write_text(text)
    run_demo(out / "runs", recipes=recipes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist10k.npz"))
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", default="runs/bench_kd_overhead")
    p.add_argument("--skip-accuracy", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    for student, teachers, size in (("test_byobnet", ["test_convnext", "test_resnet", "test_vit"], 32),
                                    ("resnet10t", ["resnet18", "resnet18"], 64)):
        t = time_steps(student, teachers, args.batch, size, args.repeats)
        a = t["a_student_hard"]
        b = sum(v for k, v in t.items() if k.startswith("b_"))
        c = t["c_meal_v2_step"]
        print(f"\n== KD overhead: student {student}, teachers {teachers}, batch {args.batch}, {size}px, "
              f"median of {args.repeats} (ms)")
        for k, v in t.items():
            print(f"  {k:40s} {v * 1000:8.1f}")
        print(f"  ratio (c) / ((a) + Σ(b)) = {c / (a + b):.3f}   [goal ≤ 1.05]")
        print(f"  teachers' share of the MEAL V2 step: {b / c:.1%}; online KD vs hard-label step: {c / a:.2f}×")

    if not args.skip_accuracy:
        print(f"\n== accuracy on {args.data} ({args.epochs} epochs per run)")
        accuracy(Path(args.data), args.epochs, Path(args.out))


if __name__ == "__main__":
    main()
