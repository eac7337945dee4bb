"""Multi-source teacher weighting: distill_weighted vs confidence vs uniform, with irrelevant teachers.

Setup (CPU-sized, stated in the output): MNIST (../shared/data/mnist10k.npz) at `--size` px. A fixed
shuffle of the training images gives each teacher its own `--teacher-images` images and the student
its target set (`--target` images, of which `--labelled` carry labels, drawn with the run's seed;
the rest are used unlabelled). Teachers (all `--model`):
  clean_a, clean_b    trained on clean digits                                      (relevant)
  noisy_labels        trained with `--noise` of its labels replaced at random       (irrelevant-ish)
  shuffled_pixels     trained on digits under a fixed pixel permutation (another
                      input distribution), then shown normal digits                 (irrelevant)
  parity              trained for another task, even/odd (2 classes): used through a
                      target head fitted on its features over the labelled subset  (other task)
Each weighting trains the same student on the target images with the pool's soft labels (KD only;
`distill train` with `pool.weighting`), `--seeds` seeds; every method fits the same target head for
the parity teacher. `confidence` uses each teacher's max probability (the target images are
unlabelled). Prints mean ± std student top-1, the learned weights (mean per-sample weights for
confidence), the DistillWeighted scores and how the weights move with τ; writes a table and a plot
to `--figures`. It measures; it asserts nothing.

    .venv/bin/python benchmarks/teacher_weighting.py [--quick] [--data PATH] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from distill.artefacts import atomic_path, write_text
from distill.data import ImageSet, load_npz_sets, subset
from distill.models import load_model
from distill.recipe import parse_config
from distill.report import markdown_table, plot_table, text_table
from distill.runner import train
from students.accuracy import evaluate
from teachers.weighting import distill_weighted

ROOT = Path(__file__).resolve().parent.parent
SPLIT_SEED = 4321
METHODS = ("uniform", "confidence", "distill_weighted")
COLORS = ("#999999", "#66aa99", "#3366cc")  # one per method, both panels


def recipe(args, name: str, seed: int, epochs: int, batch: int = 32) -> dict:
    return {"name": name, "out_dir": args.out, "seed": seed, "device": "cpu",
            "data": {"source": "npz", "path": args.data, "image_size": args.size, "augment": {"scale": [0.6, 1.0]}},
            "student": {"model": args.model},
            "optim": {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4, "schedule": "cosine"},
            "trainer": {"epochs": epochs, "batch_size": batch, "eval_batch_size": 500}}


def teacher_sets(train: ImageSet, test: ImageSet, n: int, noise: float
                 ) -> tuple[dict[str, tuple[ImageSet, ImageSet]], torch.Tensor]:
    """Each teacher's (training set, its own test set) from disjoint slices of `train`, and the
    indices left for the student."""
    gen = torch.Generator().manual_seed(SPLIT_SEED + 1)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(SPLIT_SEED))
    slices = [subset(train, order[i * n:(i + 1) * n]) for i in range(5)]
    out = {"clean_a": (slices[0], test), "clean_b": (slices[1], test)}
    noisy = slices[2].targets.clone()
    flip = torch.rand(len(noisy), generator=gen) < noise
    noisy[flip] = torch.randint(0, train.num_classes, (int(flip.sum()),), generator=gen)
    out["noisy_labels"] = (ImageSet(slices[2].images, noisy, train.class_names), test)
    perm = torch.randperm(train.image_size ** 2, generator=gen)

    def shuffle(s: ImageSet) -> ImageSet:
        x = s.images.flatten(2)[:, :, perm].reshape(s.images.shape).contiguous()
        return ImageSet(x, s.targets, s.class_names)

    out["shuffled_pixels"] = (shuffle(slices[3]), shuffle(test))
    parity = ("even", "odd")
    out["parity"] = (ImageSet(slices[4].images, slices[4].targets % 2, parity),
                     ImageSet(test.images, test.targets % 2, parity))
    return out, order[5 * n:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist10k.npz"))
    p.add_argument("--size", type=int, default=16)
    p.add_argument("--model", default="test_resnet")
    p.add_argument("--teacher-images", type=int, default=300)
    p.add_argument("--teacher-epochs", type=int, default=15)
    p.add_argument("--noise", type=float, default=0.8, help="fraction of noisy_labels' labels replaced at random")
    p.add_argument("--target", type=int, default=800, help="the student's target images")
    p.add_argument("--labelled", type=int, default=100, help="pool.labelled: labelled target images")
    p.add_argument("--test", type=int, default=1000)
    p.add_argument("--epochs", type=int, default=12, help="student epochs")
    p.add_argument("--temperature", type=float, default=0.05, help="DistillWeighted τ (pool.temperature)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the shared CPU is oversubscribed)")
    p.add_argument("--quick", action="store_true", help="1 seed")
    p.add_argument("--out", default="runs/bench_teacher_weighting")
    p.add_argument("--figures", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    if args.quick:
        args.seeds = [0]
    torch.set_num_threads(args.threads)
    figures = Path(args.figures)
    start = time.perf_counter()

    train_set, test_full = load_npz_sets(Path(args.data), args.size)
    test = subset(test_full, torch.randperm(len(test_full), generator=torch.Generator().manual_seed(SPLIT_SEED))[:args.test])
    sets, rest = teacher_sets(train_set, test, args.teacher_images, args.noise)
    target = subset(train_set, rest[:args.target])

    teachers, own, on_target = [], {}, {}
    for name, (t_train, t_test) in sets.items():
        res = train(parse_config(recipe(args, f"teacher_{name}", 0, args.teacher_epochs)), data=(t_train, t_test))
        ckpt = res.run_dir / "student.safetensors"
        teachers.append({"model": args.model, "name": name, "checkpoint": str(ckpt)})
        own[name] = res.final["test_top1"]
        on_target[name] = evaluate(load_model(ckpt), test, 500)["top1"] if name != "parity" else None
    print(f"\n== setup: MNIST {args.size}px, {args.model}; teachers on {args.teacher_images} images each "
          f"({args.teacher_epochs} epochs); student on {args.target} target images ({args.labelled} labelled), "
          f"{args.epochs} epochs, KD only; test {len(test)} (random); τ = {args.temperature}; seeds {args.seeds}")
    rows = [[n, f"{own[n]:.2f}", "-" if on_target[n] is None else f"{on_target[n]:.2f}"] for n in own]
    print(text_table(["teacher", "top-1 on its own test set", "top-1 on the target test set"], rows))

    acc: dict[str, list[float]] = {m: [] for m in METHODS}
    weights: dict[str, list[dict[str, float]]] = {m: [] for m in METHODS}
    scores: list[dict[str, float]] = []
    for seed in args.seeds:
        for method in METHODS:
            raw = {**recipe(args, f"{method}_s{seed}", seed, args.epochs),
                   "pool": {"teachers": teachers, "weighting": method, "labelled": args.labelled,
                            "temperature": args.temperature}}
            res = train(parse_config(raw), data=(target, test))
            acc[method].append(res.final["test_top1"])
            if None not in res.final["pool"]["weights"].values():  # confidence: None if resumed after its end
                weights[method].append(res.final["pool"]["weights"])
            if method == "distill_weighted":
                scores.append(res.final["pool"]["scores"])
            w = "  ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in res.final["pool"]["weights"].items())
            print(f"   seed {seed} {method:16s} top-1 {res.final['test_top1']:.2f}   weights: {w}   "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)

    def ms(v: list[float]) -> str:
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"

    names = list(own)
    mean_w = {m: {n: statistics.mean(w[n] for w in weights[m]) for n in names} for m in METHODS}
    header = ["weighting", "student top-1"] + [f"w({n})" for n in names]
    rows = [[m, ms(acc[m])] + [f"{mean_w[m][n]:.3f}" for n in names] for m in METHODS]
    title = (f"Student top-1 (%) and teacher weights, mean over seeds {args.seeds}; MNIST {args.size}px, "
             f"{args.target} target images ({args.labelled} labelled), τ = {args.temperature}")
    print(f"\n== {title}\n" + text_table(header, rows))
    mean_s = {n: statistics.mean(s[n] for s in scores) for n in names}
    print("\n== DistillWeighted scores (kNN leave-one-out accuracy on each teacher's features, labelled subset)")
    print("   " + "  ".join(f"{n} {mean_s[n]:.3f}" for n in names))
    s = torch.tensor([mean_s[n] for n in names])
    tau_rows = [[f"{tau:g}"] + [f"{w:.3f}" for w in distill_weighted(s, tau).tolist()] for tau in (0.01, 0.02, 0.05, 0.1, 0.2, 1.0)]
    print("\n== weights those scores give at other τ\n" + text_table(["τ"] + names, tau_rows))
    u, d = statistics.mean(acc["uniform"]), statistics.mean(acc["distill_weighted"])
    irrelevant = ("noisy_labels", "shuffled_pixels")
    low = max(mean_w["distill_weighted"][n] for n in irrelevant)
    print(f"\n   distill_weighted - uniform: {d - u:+.2f} points -> {'met' if d > u else 'NOT met'} (goal: weighted beats uniform)")
    print(f"   largest distill_weighted weight on an irrelevant teacher: {low:.3f} "
          f"(uniform gives {1 / len(names):.3f})")
    print(f"\n   total {time.perf_counter() - start:.0f}s")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.bar(METHODS, [statistics.mean(acc[m]) for m in METHODS],
            yerr=[statistics.stdev(acc[m]) if len(acc[m]) > 1 else 0 for m in METHODS], capsize=4,
            color=COLORS)
    lo = min(min(v) for v in acc.values())
    ax1.set_ylim(max(0, lo - 5), 100)
    ax1.set_ylabel("student test top-1 (%)")
    ax1.set_title("student accuracy", fontsize=9)
    width = 0.8 / len(METHODS)
    for i, m in enumerate(METHODS):
        ax2.bar([j + i * width for j in range(len(names))], [mean_w[m][n] for n in names], width, label=m,
                color=COLORS[i])
    ax2.set_xticks([j + width for j in range(len(names))], names, fontsize=8, rotation=15)
    ax2.set_ylabel("teacher weight")
    ax2.set_title("weights (confidence: mean per-sample)", fontsize=9)
    ax2.legend(fontsize=8)
    fig.tight_layout()
    tag = "_quick" if args.quick else ""
    figures.mkdir(parents=True, exist_ok=True)
    with atomic_path(figures / f"teacher_weighting{tag}.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    plot_table(figures / f"teacher_weighting_table{tag}.png", header, rows, title="student top-1 (%) and weights")
    write_text(figures / f"teacher_weighting{tag}.md", f"# {title}\n\n" + markdown_table(header, rows) + "\n\n"
               + "Teachers:\n\n" + markdown_table(["teacher", "top-1 own test", "top-1 target test"],
                                                  [[n, f"{own[n]:.2f}", "-" if on_target[n] is None else
                                                    f"{on_target[n]:.2f}"] for n in names])
               + "\n\nDistillWeighted scores at other τ:\n\n" + markdown_table(["τ"] + names, tau_rows) + "\n")
    write_text(figures / f"teacher_weighting{tag}.json", json.dumps(
        {"args": vars(args), "teacher_top1_own": own, "teacher_top1_target": on_target, "accuracy": acc,
         "weights": weights, "scores": scores}, indent=1))


if __name__ == "__main__":
    main()
