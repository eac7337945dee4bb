"""`distill demo`: the engine's main job on the built-in digits, end to end.

The setting is the one where distillation earns its keep: the student's job has labels for only
144 of its 1,437 training images (10 %), while teachers trained where labels were plentiful (the
full training split stands in for their labelled data) can label every image. Three teachers of
different timm architectures are trained; then the same student is trained four ways, each over
several seeds (mean ± std): hard labels on the 144 labelled images (what the student has alone),
the best single teacher's soft labels on every image and the MEAL V2 ensemble's (no hard labels
in either), and hard labels on every image (the ceiling, as if all were labelled). Every run is an
ordinary recipe from `configs/demo/`, so each can be rerun alone with `distill train`.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from distill.artefacts import write_text
from distill.config import apply_overrides, read_yaml
from distill.errors import ConfigError
from distill.recipe import parse_config
from distill.report import markdown_table, plot_bars, plot_curves, plot_table, text_table
from distill.runner import train

QUICK = ["trainer.epochs=1", "data.train_limit=128"]
SEEDS = 3


def default_recipes() -> Path:
    here = Path(__file__).resolve().parent.parent / "configs" / "demo"
    return here if here.is_dir() else Path("configs/demo")


def _run(path: Path, out: Path, overrides: list[str]):
    raw = apply_overrides(read_yaml(path), [f"out_dir={out}", *overrides])
    cfg = parse_config(raw, str(path))
    start = time.perf_counter()
    result = train(cfg)
    return result, time.perf_counter() - start


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def run_demo(out: Path, quick: bool = False, recipes: Path | None = None, seeds: int = SEEDS) -> list[list]:
    recipes = recipes or default_recipes()
    teacher_recipes = sorted(recipes.glob("teacher_*.yaml"))
    if not teacher_recipes:
        raise ConfigError(f"{recipes}: no teacher_*.yaml recipes (pass --recipes)")
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: need at least 1 student seed (3 or more for a spread)")
    extra = QUICK if quick else []
    rows, curves = [], {}

    teachers = []  # (name, model, checkpoint, top1)
    for path in teacher_recipes:
        res, secs = _run(path, out / "teachers", extra)
        top1 = res.final["test_top1"]
        teachers.append((res.cfg.name, res.cfg.student.model, res.run_dir / "student.safetensors", top1))
        curves[res.cfg.name] = res.history
        rows.append(["teacher", res.cfg.name, res.cfg.student.model, "hard, all 1,437 images", "1", f"{top1:.2f}",
                     f"{secs:.1f}", 0])

    best = max(teachers, key=lambda t: t[3])
    students = [
        ("student_hard_labelled.yaml", [], "hard, the 144 labelled images"),
        ("student_kd.yaml", [f"pool.teachers={_teacher_list([best])}"], f"best teacher ({best[0]}), all images"),
        ("student_meal_v2.yaml", [f"pool.teachers={_teacher_list(teachers)}"],
         f"MEAL V2 ensemble of {len(teachers)}, all images"),
        ("student_hard.yaml", [], "hard, all images (ceiling)"),
    ]
    bars = {}
    for fname, overrides, labels in students:
        top1s, secs, queries, name = [], 0.0, 0, fname
        for seed in range(seeds):
            res, s = _run(recipes / fname, out / "students" / f"seed{seed}", [f"seed={seed}", *overrides, *extra])
            name = res.cfg.name
            top1s.append(res.final["test_top1"])
            secs += s
            queries += res.final["teacher_queries"]
            curves.setdefault(name, res.history)
        bars[labels] = top1s
        rows.append(["student", name, res.cfg.student.model, labels, str(seeds), mean_std(top1s),
                     f"{secs:.1f}", queries])

    header = ["role", "run", "model", "labels", "seeds", "top-1 (mean ± std)", "wall s", "teacher queries"]
    print("\n" + text_table(header, rows))
    headline = _headline(bars, students)
    print("\n" + headline)
    plot_curves(out / "curves.png", curves)
    plot_table(out / "table.png", header, rows, "distill demo: digits")
    plot_bars(out / "students.png", bars, "student top-1 over seeds (test, final epoch)")
    write_text(out / "report.md", "\n".join([
        "# distill demo: distillation on images without labels (digits)", "",
        "The student's job has labels for 144 of the 1,437 training images. Teachers of different "
        "architectures, trained where labels were plentiful, label every image: the same student is "
        "trained on the 144 hard labels alone, on the best teacher's soft labels, on the MEAL V2 "
        "ensemble's (mean of the teachers' softmax, soft cross-entropy on outputs, the output "
        "discriminator, no hard-label term), and on hard labels for every image (the ceiling). Student "
        f"rows are mean ± std over {seeds} seed(s) of the final epoch's test top-1.", "",
        markdown_table(header, rows), "", headline, "", "![students](students.png)", "",
        "![curves](curves.png)", "", "![table](table.png)", "",
        "Each run has its own directory (config.yaml, metrics.jsonl, checkpoints, report.md) under "
        "`teachers/` and `students/seed<k>/`; `distill train` reruns any of them.", ""]))
    print(f"\nreport: {out / 'report.md'}")
    return rows


def _headline(bars: dict[str, list[float]], students) -> str:
    """What the teachers' labels are worth, in points, beside the seed spread it must exceed."""
    alone, single, ensemble, ceiling = (bars[s[2]] for s in students)
    spread = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in bars.values())
    gain = {name: statistics.mean(v) - statistics.mean(alone) for name, v in (("best teacher", single),
                                                                                ("MEAL V2 ensemble", ensemble))}
    lost = statistics.mean(ceiling) - statistics.mean(alone)
    return ("Teacher labels on the images without labels, over the labelled-only student: "
            + ", ".join(f"{k} {v:+.2f}" for k, v in gain.items())
            + f" top-1 points (all labels: {lost:+.2f}); the largest seed std is {spread:.2f}.")


def _teacher_list(teachers) -> str:
    return json.dumps([{"model": m, "name": n, "checkpoint": str(c)} for n, m, c, _ in teachers])
