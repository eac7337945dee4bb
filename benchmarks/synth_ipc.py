"""Distilled datasets vs random real subsets at IPC 1/10/50, hard and stored-soft labels, FYI on/off.

    .venv/bin/python benchmarks/synth_ipc.py --quick
    .venv/bin/python benchmarks/synth_ipc.py                       # digits, IPC 1/10, every method
    .venv/bin/python benchmarks/synth_ipc.py --datasets digits,mnist --ipcs 1,10,50 --seeds 3 --budget full

For each dataset and IPC: every method (bn_matching, distribution_matching, gradient_matching),
with and without FYI flip, is synthesised once (hard labels); the relabel variant reuses the same
synthesised chunks and only adds the teacher's stored soft labels, one stored crop per image per student
epoch (FKD's protocol: a relabel student sees a new crop every epoch, as a hard-label student does).
bn_matching runs as its shipped CPU recipes do (`real_confident` init, Adam lr 0.01; `--init`,
`--bn-lr` override); DM and GM start from random real images. `distill eval-synth` then
trains fresh ConvNet-3 students (3 seeds by default) on each artefact, on the random real subset
at the same IPC with the same label mode, and on the full data. Everything is cached under --out:
a rerun only computes what is missing. This script measures; it asserts nothing.

Budgets (`--budget`): `cpu` (default) shortens synthesis iterations, GM's inner loop and student
epochs so the grid fits a loaded CPU; `full` uses the references' lengths (needs a GPU). The
anchor (MNIST 28 px, ConvNet-3, DC, 1000-epoch evaluation): 91.7 / 97.4 / 98.8 at IPC 1 / 10 / 50.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill.recipe import (
    parse_config,  # noqa: E402
    parse_synth_config,  # noqa: E402
)
from distill.report import text_table, write_benchmark_report  # noqa: E402
from synth.eval_synth import eval_synth  # noqa: E402
from synth.run import synthesize  # noqa: E402

NO_FLIP_OPS = ["color", "crop", "cutout", "scale", "rotate"]  # digits: a mirrored digit is another symbol
ANCHOR_MNIST_DC = {1: 91.7, 10: 97.4, 50: 98.8}
BUDGETS = {
    # synthesis iterations per method, GM inner loop (None: the reference's), student epochs per IPC,
    # full-data epochs, real images per class per matching step, student batch
    "quick": {"iters": {"distribution_matching": 20, "gradient_matching": 10, "bn_matching": 40}, "inner": 2,
              "epochs": {1: 60, 10: 15, 50: 5}, "full_epochs": 3, "batch_real": 16, "batch": 32},
    "cpu": {"iters": {"distribution_matching": 40, "gradient_matching": 20, "bn_matching": 80}, "inner": 2,
            "epochs": {1: 80, 10: 25, 50: 10}, "full_epochs": 5, "batch_real": 32, "batch": 32},
    "full": {"iters": {"distribution_matching": 20000, "gradient_matching": 1000, "bn_matching": 1000}, "inner": None,
             "epochs": {1: 1000, 10: 1000, 50: 1000}, "full_epochs": 100, "batch_real": 256, "batch": 256},
}


def data_section(dataset: str, size: int, mnist: str) -> dict:
    if dataset == "digits":
        return {"source": "digits", "image_size": size}
    return {"source": "npz", "path": mnist, "image_size": size}


def train_teacher(dataset: str, size: int, mnist: str, out: Path, epochs: int) -> Path:
    """A BatchNorm ResNet teacher (bn_matching, relabel), trained once and cached."""
    from distill.runner import train

    ckpt = out / "teachers" / f"teacher_{dataset}{size}_e{epochs}" / "student.safetensors"
    if ckpt.is_file():
        return ckpt
    cfg = parse_config({"name": f"teacher_{dataset}{size}_e{epochs}", "seed": 0, "out_dir": str(out / "teachers"),
                        "data": data_section(dataset, size, mnist), "student": {"model": "test_resnet"},
                        "optim": {"name": "sgd", "lr": 0.1, "weight_decay": 5e-4, "schedule": "cosine"},
                        "trainer": {"epochs": epochs, "batch_size": 64}})
    res = train(cfg)
    print(f"teacher {dataset}: top-1 {res.final['test_top1']:.2f}")
    return ckpt


BN_SHIPPED = {"lr": 0.01, "init": "real_confident"}  # the CPU recipes' bn_matching (configs/synth/*_bn_*.yaml)


def method_options(method: str, budget: dict, bn_lr: float | None = None) -> dict:
    if method == "bn_matching":
        lr = BN_SHIPPED["lr"] if bn_lr is None else bn_lr  # SRe2L's Adam lr is 0.25
        return {"jitter": 2, "jitter_flip": False,
                "optim": {"name": "adam", "lr": lr, "betas": [0.5, 0.9], "schedule": "cosine"}}
    opts = {"batch_real": budget["batch_real"], "dsa_ops": NO_FLIP_OPS}
    if method == "gradient_matching" and budget["inner"] is not None:
        opts["inner_loop"] = budget["inner"]
    return opts


def recipe(dataset, size, mnist, ipc, method, flip, labels, teacher, budget, seeds, out, init, bn_lr=None):
    if method == "bn_matching" and init is None:
        init = BN_SHIPPED["init"]
    init = init or "real"
    tag = (f"_{init}" if init != "real" else "") + (f"_lr{bn_lr}" if bn_lr is not None and method == "bn_matching" else "")
    name = f"{dataset}{size}_{method}_ipc{ipc}{'_flip' if flip else ''}_{labels}{tag}"
    raw = {"name": name, "seed": 0, "out_dir": str(out / "artefacts"), "keep_work": labels == "hard", "data": data_section(dataset, size, mnist),
           "ipc": ipc, "method": method, "options": method_options(method, budget, bn_lr), "flip": flip,
           "iterations": budget["iters"][method], "init": {"kind": init},
           "teachers": [{"name": "resnet", "model": "test_resnet", "checkpoint": str(teacher)}] if teacher else [],
           "labels": {"mode": labels, "relabel": {"epochs": budget["epochs"][ipc], "crops_per_image": 1, "topk": 5, "scale": [0.35, 1.0]}},
           "eval": {"students": ["convnet3"], "seeds": seeds, "epochs": budget["epochs"][ipc], "batch_size": budget["batch"],
                    "full_epochs": budget["full_epochs"], "dsa_ops": NO_FLIP_OPS}}
    return parse_synth_config(raw, name)


def make_artefact(cfg, hard_root: Path | None):
    """Synthesise; a relabel variant first takes the hard variant's finished chunks (same pixels)."""
    if hard_root is not None and not (cfg.run_dir / "manifest.json").exists():
        work = cfg.run_dir / "work"
        work.mkdir(parents=True, exist_ok=True)
        for f in (hard_root / "work").glob("*.safetensors"):
            if not (work / f.name).exists():
                shutil.copy2(f, work / f.name)
    return synthesize(cfg, progress=False)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="digits, IPC 1, DM and BN, hard labels, 1 seed, tiny budgets")
    p.add_argument("--datasets", default="digits", help="comma list of digits, mnist")
    p.add_argument("--mnist", default=str(ROOT.parent / "shared" / "data" / "mnist10k.npz"))
    p.add_argument("--ipcs", default="1,10")
    p.add_argument("--methods", default="distribution_matching,gradient_matching,bn_matching")
    p.add_argument("--labels", default="hard,relabel")
    p.add_argument("--flips", default="0,1")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--size", type=int, default=16, help="image size (digits 8×8 and MNIST 28 px are resized)")
    p.add_argument("--budget", default="cpu", choices=sorted(BUDGETS))
    p.add_argument("--init", default=None, choices=["noise", "real", "real_confident"],
                   help="every method's init (default: real; bn_matching real_confident, as its recipes)")
    p.add_argument("--bn-lr", type=float, default=None, help="bn_matching Adam lr (default 0.01, as its recipes; SRe2L's is 0.25)")
    p.add_argument("--teacher-epochs", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="default runs/bench_synth_ipc[_quick]")
    args = p.parse_args()
    args.out = args.out or str(ROOT / "runs" / ("bench_synth_ipc_quick" if args.quick else "bench_synth_ipc"))
    if args.quick:
        args.ipcs, args.methods, args.labels, args.seeds, args.budget = "1", "distribution_matching,bn_matching", "hard", 1, "quick"
        args.teacher_epochs = min(args.teacher_epochs, 4)
    torch.set_num_threads(args.threads)
    budget, out = BUDGETS[args.budget], Path(args.out)
    datasets = args.datasets.split(",")
    ipcs = [int(i) for i in args.ipcs.split(",")]
    methods, labels = args.methods.split(","), args.labels.split(",")
    flips = [bool(int(f)) for f in args.flips.split(",")]
    print(f"synth_ipc: datasets {datasets}, IPC {ipcs}, methods {methods}, flip {flips}, labels {labels}, "
          f"{args.seeds} seeds, budget {args.budget} {budget}, {args.size}px, init {args.init}, threads {args.threads}")

    header = ["data", "IPC", "train set", "FYI flip", "labels", "label bytes", "top-1 (final, mean ± std)",
              "Δ vs random", "synth s/class"]
    rows, records = [], []
    start = time.perf_counter()
    for ds in datasets:
        needs_teacher = "bn_matching" in methods or "relabel" in labels or args.init == "real_confident"
        teacher = train_teacher(ds, args.size, args.mnist, out, args.teacher_epochs) if needs_teacher else None
        cache = out / "eval_cache" / ds
        for ipc in ipcs:
            random_cells, full_cell = {}, None
            for method in methods:
                for flip in flips:
                    hard_root = None
                    for mode in labels:
                        cfg = recipe(ds, args.size, args.mnist, ipc, method, flip, mode, teacher, budget, args.seeds,
                                     out, args.init, args.bn_lr)
                        t0 = time.perf_counter()
                        res = make_artefact(cfg, hard_root if mode == "relabel" else None)
                        if mode == "hard":
                            hard_root = res.root
                        rep = eval_synth(res.root, progress=False, cache_dir=cache)
                        d, r = rep.cell("convnet3", "distilled"), rep.cell("convnet3", "random")
                        random_cells[mode], full_cell = r, rep.cell("convnet3", "full") or full_cell
                        spc = res.manifest["timing"]["seconds_per_class"]
                        rows.append([ds, ipc, method, "on" if flip else "off", mode, f"{d.label_bytes:,}",
                                     f"{d.mean:.2f} ± {d.std:.2f}", f"{d.mean - r.mean:+.2f}", f"{spc:.2f}"])
                        records.append({"data": ds, "ipc": ipc, "method": method, "flip": flip, "labels": mode,
                                        "top1": d.final, "random_top1": r.final, "label_bytes": d.label_bytes,
                                        "image_bytes": d.image_bytes, "synth_seconds_per_class": spc,
                                        "wall_seconds": time.perf_counter() - t0})
                        print(text_table(header, [rows[-1]]).splitlines()[-1], flush=True)
            for mode, r in random_cells.items():
                rows.append([ds, ipc, "random real subset", "-", mode, f"{r.label_bytes:,}",
                             f"{r.mean:.2f} ± {r.std:.2f}", "0.00", "-"])
                records.append({"data": ds, "ipc": ipc, "method": "random", "labels": mode, "top1": r.final})
            if full_cell is not None:
                rows.append([ds, ipc, f"full data ({full_cell.images} images)", "-", "hard",
                             f"{full_cell.label_bytes:,}", f"{full_cell.mean:.2f} ± {full_cell.std:.2f}", "", "-"])
                records.append({"data": ds, "ipc": ipc, "method": "full", "labels": "hard", "top1": full_cell.final})

    print("\n" + text_table(header, rows))
    print(f"\nConvNet-3 students, final-epoch top-1 over {args.seeds} seed(s); student epochs by IPC "
          f"{budget['epochs']}, full data {budget['full_epochs']} epochs; wall {time.perf_counter() - start:.0f}s")
    print(f"bn_matching: init {args.init or BN_SHIPPED['init']}, Adam lr {args.bn_lr or BN_SHIPPED['lr']}; "
          f"other methods: init {args.init or 'real'}; relabel: one stored crop per image per student epoch")
    print(f"anchor (MNIST 28px, DC, 1000-epoch protocol): {ANCHOR_MNIST_DC}")
    goals = []
    for rec in records:
        if rec["method"] in ("random", "full"):
            continue
        beat = sum(rec["top1"]) / len(rec["top1"]) - sum(rec["random_top1"]) / len(rec["random_top1"])
        if rec["ipc"] in (1, 10):
            goals.append(f"{rec['data']} IPC{rec['ipc']} {rec['method']} flip={rec['flip']} {rec['labels']}: "
                         f"{'beats' if beat > 0 else 'DOES NOT beat'} random ({beat:+.2f})")
    fulls = {(r["data"], r["ipc"]): sum(r["top1"]) / len(r["top1"]) for r in records if r["method"] == "full"}
    for rec in records:
        if rec["method"] not in ("random", "full") and rec["labels"] == "relabel" and rec["ipc"] == 10:
            gap = fulls[(rec["data"], 10)] - sum(rec["top1"]) / len(rec["top1"])
            goals.append(f"{rec['data']} IPC10 {rec['method']} flip={rec['flip']} soft labels: {gap:.2f} points "
                         f"below full data ({'within' if gap <= 2 else 'NOT within'} 2)")
    print("\n".join(["goals:"] + [f"  {g}" for g in goals]))
    results = {"args": vars(args), "budget": budget, "records": records}
    report = write_benchmark_report(out, "synth_ipc", header, rows, results,
                                    "distilled sets vs random real subset (ConvNet-3)", sys.argv)
    print(f"report: {report}")


if __name__ == "__main__":
    main()
