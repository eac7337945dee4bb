"""Reports: Markdown with PNG plots, written into a run directory. Matplotlib loads lazily."""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from distill.artefacts import atomic_path, write_text


def _plt():
    import matplotlib  # heavy: loaded when a plot is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    """Lay out, write the PNG atomically, free the figure."""
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_curves(path: Path, runs: dict[str, list[dict[str, Any]]], keys: Sequence[str] = ("train_loss", "test_top1")) -> None:
    """One panel per metric, one line per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6))
    for ax, key in zip(axes if len(keys) > 1 else [axes], keys):
        for name, hist in runs.items():
            pts = [(r["epoch"], r[key]) for r in hist if key in r]
            if pts:
                ax.plot(*zip(*pts), label=name, marker=".")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    (axes[0] if len(keys) > 1 else axes).legend(fontsize=8)
    _save(plt, fig, path)


def plot_table(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(2 + 1.6 * len(header), 16), 0.6 + 0.35 * (len(rows) + 1)))
    ax.axis("off")
    table = ax.table(cellText=[[str(c) for c in r] for r in rows], colLabels=list(header), loc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1, 1.3)
    if title:
        ax.set_title(title, fontsize=10)
    _save(plt, fig, path)


def plot_bars(path: Path, groups: dict[str, list[float]], title: str = "") -> None:
    """One bar per group at its mean, whiskers at ± std, every value drawn as a dot."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.55 * len(groups)))
    for i, values in enumerate(groups.values()):
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.barh(i, statistics.mean(values), xerr=std, color="#9bb7d4", capsize=4)
        ax.plot(values, [i] * len(values), "k.", ms=5)
    ax.set_yticks(range(len(groups)), list(groups), fontsize=8)
    lo = min(min(v) for v in groups.values())
    ax.set_xlim(max(0.0, lo - 5), 100)
    ax.invert_yaxis()
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    _save(plt, fig, path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(cells[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells[1:]])


def write_benchmark_report(out: Path, name: str, header: Sequence[str], rows: Sequence[Sequence[Any]],
                           results: dict[str, Any], title: str, command: Sequence[str]) -> Path:
    """A benchmark's `results.json`, `table.png` and `report.md` (the command, the table) under `out`."""
    write_text(out / "results.json", json.dumps(results, indent=1, default=str))
    plot_table(out / "table.png", header, rows, title)
    write_text(out / "report.md", "\n".join([f"# {name} benchmark", "", f"`{' '.join(command)}`", "",
                                             markdown_table(header, rows), "", "![table](table.png)", ""]))
    return out / "report.md"


def write_run_report(run_dir: Path, cfg, history: list[dict[str, Any]], final: dict[str, Any], labels: str,
                     sections: Sequence[str] = ()) -> None:
    """`report.md` + `curves.png` of a training run; `labels` says what the labels were, `sections`
    are the label source's own (Markdown lines: pool weights, query budget, ...)."""
    plot_curves(run_dir / "curves.png", {cfg.name: history})
    rows = [[r["epoch"], f"{r['train_loss']:.4f}", f"{r['test_top1']:.2f}", f"{r['test_top5']:.2f}",
             f"{r['epoch_seconds']:.1f}", r["teacher_queries"]] for r in history]
    text = [f"# Run `{cfg.name}`", "", f"- student: `{cfg.student.model}`; labels: {labels}",
            f"- data: {cfg.data.source} at {cfg.data.image_size}px; seed {cfg.seed}; config hash `{cfg.hash()}`",
            f"- final: top-1 **{final['test_top1']:.2f}**, top-5 {final['test_top5']:.2f}; "
            f"teacher queries {final['teacher_queries']} ({final['teacher_seconds']:.1f} s in teachers)", "",
            "![curves](curves.png)", "",
            markdown_table(["epoch", "train loss", "top-1", "top-5", "seconds", "teacher queries"], rows), ""]
    if final.get("bad_images_skipped"):
        text.insert(5, f"- undecodable training images skipped (data.on_bad_image: skip): {final['bad_images_skipped']}")
    text += list(sections)
    write_text(run_dir / "report.md", "\n".join(text))
