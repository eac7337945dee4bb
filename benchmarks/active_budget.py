"""Accuracy vs teacher-query budget for active distillation strategies (rad, margin, entropy, random).

Setup (CPU-sized, stated in the output): MNIST (../shared/data/mnist10k.npz) at `--size` px. A fixed
shuffle of the 8,000 training images gives four disjoint parts: the teacher's training images
(`--teacher-images`, deliberately few, so the teacher is imperfect), a validation slice on which the
teacher's accuracy is measured once (its "model card" number), the student's labelled set L
(`--labelled`) and its unlabelled pool U (`--pool`). The test set is the first `--test` test images.

Every run is `distill train` with `labels.active` (the same code path as a recipe): round 0 on L,
then `--rounds` rounds of select → query → train (`--epochs` per round) until the budget (a fraction
of U's images) is spent. 100 % queries every pool image, so the strategies coincide there: it runs
once per seed (strategy `random`) and is the full-query reference. rad's k comes from the teacher's
validation error (given, so no strategy pays budget for it); `--rad-calibrate` instead measures it
on L from the budget (our engine's default).

    .venv/bin/python benchmarks/active_budget.py [--quick] [--data PATH] [--seeds 0 1 2]

Prints mean ± std of final student top-1 over seeds per strategy and budget, rad at 25 % relative to
the full-query student, and teacher top-1 on the selected images; writes a plot and a table
(Markdown, PNG) to `--figures`. It measures; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from distill.artefacts import atomic_path, write_text
from distill.data import load_npz_sets, subset
from distill.recipe import parse_config
from distill.report import markdown_table, plot_table, text_table
from distill.runner import train
from students.accuracy import evaluate

ROOT = Path(__file__).resolve().parent.parent
SPLIT_SEED = 1234  # the fixed shuffle that carves teacher / validation / L / U out of the training set


def parts(data: Path, size: int, teacher_n: int, val_n: int, labelled: int, pool: int, test_n: int):
    train, test = load_npz_sets(data, size)
    need = teacher_n + val_n + labelled + pool
    if need > len(train):
        raise SystemExit(f"{need} training images asked for, {data} has {len(train)}")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    cut = torch.tensor([teacher_n, val_n, labelled + pool]).cumsum(0).tolist()
    t_idx, v_idx, s_idx = order[:cut[0]], order[cut[0]:cut[1]], order[cut[1]:cut[2]]
    test_idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(SPLIT_SEED))[:test_n]
    return subset(train, t_idx), subset(train, v_idx), subset(train, s_idx), subset(test, test_idx)


def common(args, out: Path, name: str, seed: int) -> dict:
    return {"name": name, "out_dir": str(out), "seed": seed, "device": "cpu",
            "data": {"source": "npz", "path": args.data, "image_size": args.size,
                     "augment": {"scale": [0.6, 1.0]}},
            "student": {"model": args.model},
            "optim": {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4, "schedule": "cosine"},
            "trainer": {"epochs": args.epochs, "batch_size": 32, "eval_batch_size": 500}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist10k.npz"))
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--model", default="test_resnet", help="student and teacher")
    p.add_argument("--teacher-images", type=int, default=150)
    p.add_argument("--teacher-epochs", type=int, default=40)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--labelled", type=int, default=50)
    p.add_argument("--pool", type=int, default=1000)
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2, help="student epochs per round")
    p.add_argument("--round-images", type=int, default=1200, help="labels.active.round_images (min images/epoch)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared CPU is oversubscribed)")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.25, 1.0, 0.10, 0.05, 0.50],
                   help="run in this order (runs resume, so a rerun skips finished ones)")
    p.add_argument("--strategies", nargs="+", default=["rad", "margin", "entropy", "random"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rad-calibrate", action="store_true", help="rad measures the teacher error on L (budget)")
    p.add_argument("--quick", action="store_true", help="1 seed, budgets 10/25/100 %%")
    p.add_argument("--out", default="runs/bench_active_budget")
    p.add_argument("--figures", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    if args.quick:
        args.seeds, args.budgets = [0], [0.10, 0.25, 1.0]
    torch.set_num_threads(args.threads)
    out, figures = Path(args.out), Path(args.figures)
    figures.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    t_set, v_set, s_set, test = parts(Path(args.data), args.size, args.teacher_images, args.val, args.labelled,
                                      args.pool, args.test)
    teacher_cfg = {**common(args, out, "teacher", 0), "trainer": {"epochs": args.teacher_epochs, "batch_size": 32,
                                                                 "eval_batch_size": 500}}
    teacher = train(parse_config(teacher_cfg), data=(t_set, test))
    ckpt = str(teacher.run_dir / "student.safetensors")
    from distill.models import load_model

    t_val = evaluate(load_model(ckpt), v_set, 500)["top1"]
    t_test = teacher.final["test_top1"]
    print(f"\n== setup: MNIST {args.size}px, student/teacher {args.model}; teacher trained on "
          f"{args.teacher_images} images ({args.teacher_epochs} epochs): validation top-1 {t_val:.2f} "
          f"({args.val} images), test top-1 {t_test:.2f}")
    print(f"   L = {args.labelled} labelled, U = {args.pool} pool images, test {len(test)} (random); "
          f"{args.rounds} rounds × {args.epochs} epochs (>= {args.round_images} images/epoch); seeds {args.seeds}")

    results: dict[tuple[str, float], list[float]] = {}
    teacher_sel: dict[tuple[str, float], list[float]] = {}
    for budget in args.budgets:  # budget-major, in the order given: a cut-short run has whole budgets
        for seed in args.seeds:
            for strategy in (["random"] if budget >= 1.0 else args.strategies):
                key = ("full" if budget >= 1.0 else strategy, budget)
                active = {"budget": budget, "rounds": args.rounds, "strategy": strategy, "labelled": args.labelled,
                          "round_images": args.round_images}
                if strategy == "rad" and not args.rad_calibrate:
                    active["teacher_error"] = round(1 - t_val / 100, 4)
                raw = {**common(args, out, f"{key[0]}_b{int(budget * 100):03d}_s{seed}", seed),
                       "pool": {"teachers": [{"model": args.model, "checkpoint": ckpt, "name": "teacher"}]},
                       "labels": {"active": active}}
                res = train(parse_config(raw), data=(s_set, test))
                rounds = [r for r in res.final["active"]["rounds"] if r.get("teacher_top1_selected") is not None]
                results.setdefault(key, []).append(res.final["test_top1"])
                teacher_sel.setdefault(key, []).append(
                    sum(r["teacher_top1_selected"] * r["images"] for r in rounds) / max(1, sum(r["images"] for r in rounds)))
                print(f"   seed {seed} {key[0]:8s} {budget:5.0%}: top-1 {res.final['test_top1']:.2f}, queries "
                      f"{res.final['active']['spent_queries']}/{res.final['active']['budget_queries']}, teacher "
                      f"top-1 on selected {teacher_sel[key][-1]:.1f}  ({time.perf_counter() - start:.0f}s)", flush=True)

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"

    budgets = sorted(b for b in args.budgets if b < 1.0)
    header = ["strategy"] + [f"{b:.0%}" for b in budgets] + (["100 %"] if any(b >= 1 for b in args.budgets) else [])
    rows, sel_rows = [], []
    full = results.get(("full", 1.0))
    for s in args.strategies:
        rows.append([s] + [ms(results[(s, b)]) for b in budgets] + ([ms(full)] if full else []))
        sel_rows.append([s] + [f"{statistics.mean(teacher_sel[(s, b)]):.1f}" for b in budgets]
                        + ([f"{statistics.mean(teacher_sel[('full', 1.0)]):.1f}"] if full else []))
    title = (f"Student top-1 (%) vs teacher-query budget, mean ± std over seeds {args.seeds}; MNIST {args.size}px, "
             f"|L|={args.labelled}, |U|={args.pool}, teacher val top-1 {t_val:.1f}")
    print(f"\n== {title}\n" + text_table(header, rows))
    print("\n== teacher top-1 (%) on the images each strategy sent (diagnostic)\n" + text_table(header, sel_rows))
    if full:
        f = statistics.mean(full)
        print(f"\n== full-query student (100 %): {ms(full)}")
        for b in budgets:
            line = "  ".join(f"{s} {statistics.mean(results[(s, b)]) / f:.3f}" for s in args.strategies)
            print(f"   {b:.0%} budget / full: {line}")
        if 0.25 in budgets and "rad" in args.strategies:
            r = statistics.mean(results[("rad", 0.25)]) / f
            print(f"   goal rad@25% >= 0.98 × full: {r:.3f} -> {'met' if r >= 0.98 else 'NOT met'}")
    for b in budgets:
        means = {s: statistics.mean(results[(s, b)]) for s in args.strategies}
        order = " > ".join(sorted(means, key=means.get, reverse=True))
        print(f"   ranking at {b:.0%}: {order}")
    print(f"\n   total {time.perf_counter() - start:.0f}s")

    # figures: accuracy vs budget per strategy (+ the full-query line), and the table
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in args.strategies:
        m = [statistics.mean(results[(s, b)]) for b in budgets]
        e = [statistics.stdev(results[(s, b)]) if len(results[(s, b)]) > 1 else 0 for b in budgets]
        ax.errorbar([b * 100 for b in budgets], m, yerr=e, marker="o", capsize=3, label=s)
    if full:
        ax.axhline(statistics.mean(full), color="k", ls="--", lw=1, label="full query (100 %)")
        ax.axhline(0.98 * statistics.mean(full), color="grey", ls=":", lw=1, label="98 % of full")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([b * 100 for b in budgets], [f"{b:.0%}" for b in budgets])
    ax.set_xlabel("teacher-query budget (% of pool images)")
    ax.set_ylabel("student test top-1 (%)")
    ax.set_title(f"Active distillation, MNIST {args.size}px, teacher val {t_val:.1f}%", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tag = "_quick" if args.quick else ""
    with atomic_path(figures / f"active_budget{tag}.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    plot_table(figures / f"active_budget_table{tag}.png", header, rows, title="student top-1 (%)")
    write_text(figures / f"active_budget{tag}.md",
        f"# {title}\n\n" + markdown_table(header, rows) + "\n\nTeacher top-1 (%) on the selected images:\n\n"
        + markdown_table(header, sel_rows) + "\n")
    write_text(figures / f"active_budget{tag}.json", json.dumps(
        {"args": vars(args), "teacher_val_top1": t_val, "teacher_test_top1": t_test,
         "results": {f"{k[0]}@{k[1]}": v for k, v in results.items()},
         "teacher_top1_selected": {f"{k[0]}@{k[1]}": v for k, v in teacher_sel.items()}}, indent=1))


if __name__ == "__main__":
    main()
