"""`distill demo`: the engine's main job on the built-in digits, end to end.

Trains a pool of teachers of different timm architectures (supervised = distillation with no
teacher), then the same student three ways — hard labels, distilled from the best single teacher,
distilled from the MEAL V2 ensemble — and writes a table, curves and a report. Every run is an
ordinary recipe from `configs/demo/`, so each can be rerun alone with `distill train`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from distill.artefacts import write_text
from distill.config import apply_overrides, read_yaml
from distill.errors import ConfigError
from distill.recipe import parse_config
from distill.report import markdown_table, plot_curves, plot_table, text_table
from distill.runner import train

QUICK = ["trainer.epochs=1", "data.train_limit=128"]


def default_recipes() -> Path:
    here = Path(__file__).resolve().parent.parent / "configs" / "demo"
    return here if here.is_dir() else Path("configs/demo")


def _run(path: Path, out: Path, overrides: list[str]):
    raw = apply_overrides(read_yaml(path), [f"out_dir={out}", *overrides])
    cfg = parse_config(raw, str(path))
    start = time.perf_counter()
    result = train(cfg)
    return result, time.perf_counter() - start


def run_demo(out: Path, quick: bool = False, recipes: Path | None = None) -> list[list]:
    recipes = recipes or default_recipes()
    teacher_recipes = sorted(recipes.glob("teacher_*.yaml"))
    if not teacher_recipes:
        raise ConfigError(f"{recipes}: no teacher_*.yaml recipes (pass --recipes)")
    extra = QUICK if quick else []
    rows, curves = [], {}

    teachers = []  # (name, checkpoint, top1)
    for path in teacher_recipes:
        res, secs = _run(path, out / "teachers", extra)
        ckpt = res.run_dir / "student.safetensors"
        teachers.append((res.cfg.name, res.cfg.student.model, ckpt, res.final["test_top1"]))
        curves[res.cfg.name] = res.history
        rows.append(["teacher", res.cfg.name, res.cfg.student.model, "hard labels", f"{res.final['test_top1']:.2f}",
                     f"{res.final['test_top5']:.2f}", f"{secs:.1f}", 0])

    best = max(teachers, key=lambda t: t[3])
    pool = [f"pool.teachers={_teacher_list(teachers)}"]
    students = [("student_hard.yaml", [], "hard labels"),
                ("student_kd.yaml", [f"pool.teachers={_teacher_list([best])}"], f"best teacher ({best[0]})"),
                ("student_meal_v2.yaml", pool, f"MEAL V2 ensemble of {len(teachers)}")]
    for fname, overrides, labels in students:
        res, secs = _run(recipes / fname, out / "students", [*overrides, *extra])
        curves[res.cfg.name] = res.history
        rows.append(["student", res.cfg.name, res.cfg.student.model, labels, f"{res.final['test_top1']:.2f}",
                     f"{res.final['test_top5']:.2f}", f"{secs:.1f}", res.final["teacher_queries"]])

    header = ["role", "run", "model", "labels", "top-1", "top-5", "wall s", "teacher queries"]
    print("\n" + text_table(header, rows))
    plot_curves(out / "curves.png", curves)
    plot_table(out / "table.png", header, rows, "distill demo: digits")
    write_text(out / "report.md", "\n".join([
        "# distill demo: MEAL V2 ensemble distillation on digits", "",
        "Teachers of different architectures are trained on hard labels; the same student is then trained "
        "with hard labels, from the best single teacher, and from the MEAL V2 ensemble (mean of the teachers' "
        "softmax, soft cross-entropy on outputs, the output discriminator, no hard-label term).", "",
        markdown_table(header, rows), "", "![curves](curves.png)", "", "![table](table.png)", "",
        "Each run has its own directory (config.yaml, metrics.jsonl, checkpoints, report.md) under "
        "`teachers/` and `students/`.", ""]))
    print(f"\nreport: {out / 'report.md'}")
    return rows


def _teacher_list(teachers) -> str:
    return json.dumps([{"model": m, "name": n, "checkpoint": str(c)} for n, m, c, _ in teachers])
