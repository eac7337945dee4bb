"""FKD/FerKD label store benchmark: epoch cost, bytes, and accuracy at equal epochs.

    .venv/bin/python benchmarks/fkd_store.py [--quick] [--data ../shared/data/mnist10k.npz] [--out runs/bench_fkd]

P1  one student epoch replayed from a store vs the same epoch on hard labels (same loader, batch,
    student, views), and vs online KD with the same teacher; plus FKD multi-crop loading (4 views per
    loaded image, a quarter of the images per batch, so views per step are equal). All measured in this
    one process with the variants stepped in lockstep (load on a shared machine hits them alike).
B   bytes per crop and per image-epoch, measured from written stores, for k = 1, 5, 10, full at 10
    classes (digits) and at 1,000 classes (synthetic images, an untrained teacher: bytes do not depend
    on what the labels say), and what that means at ImageNet-1K scale (1.28 M images, 300 epochs).
A   top-1 vs epoch on digits and MNIST-10k: hard labels, online KD, FKD store, FerKD store, FerKD +
    SelfMix store. Equal epochs and equal student views (one view per image per epoch), same teacher.
It measures and prints; it asserts nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from distill.data import ImageSet, load_data  # noqa: E402
from distill.generate_store import generate_labels  # noqa: E402
from distill.recipe import parse_config  # noqa: E402
from distill.report import plot_curves, text_table  # noqa: E402
from distill.runner import train  # noqa: E402

TEACHER, STUDENT = "test_resnet", "test_vit"
IMAGENET_IMAGES, IMAGENET_EPOCHS = 1_281_167, 300


def recipe(name: str, out: Path, data: dict, epochs: int, model: str = STUDENT, batch: int = 64, **extra) -> dict:
    raw = {"name": name, "seed": extra.pop("seed", 0), "out_dir": str(out), "data": data,
           "student": {"model": model}, "optim": {"name": "sgd", "lr": 0.05, "schedule": "cosine"},
           "trainer": {"epochs": epochs, "batch_size": batch, "eval_batch_size": 500}}
    raw.update(extra)
    return raw


def run(raw: dict):
    return train(parse_config(raw, raw["name"]))


def store_section(out: Path, name: str, views: int, **generate) -> dict:
    return {"store": str(out / "stores" / name), "crops_per_image": views, "generate": generate}


# ---------------------------------------------------------------------------------------------- A


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f}" + (f" ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else "")


def accuracy(ds: str, data: dict, out: Path, teacher_epochs: int, epochs: int, bank: int, seeds: list[int]):
    """Teacher on hard labels, then the same student five ways, per seed. Stores are generated once
    (with the first seed's crops) and replayed by every student seed. Returns (rows, curves, pool,
    teacher top-1); curves are the per-epoch mean over seeds."""
    t0 = time.perf_counter()
    teacher = run(recipe(f"{ds}_teacher", out / "teachers", data, teacher_epochs, model=TEACHER,
                         optim={"name": "sgd", "lr": 0.1, "schedule": "cosine"}))
    print(f"[{ds}] teacher {TEACHER}: top-1 {teacher.final['test_top1']:.2f} ({time.perf_counter() - t0:.0f}s)")
    pool = {"teachers": [{"name": "teacher", "model": TEACHER, "checkpoint": str(teacher.run_dir / "student.safetensors")}]}
    gen = {"topk": 5, "batch_size": 1024}
    methods = {
        "hard labels": {},
        "online KD": {"pool": pool},
        "FKD store": {"pool": pool, "labels": store_section(out, f"{ds}_fkd", 1, crops_per_image=1, **gen)},
        "FerKD store": {"pool": pool, "labels": store_section(out, f"{ds}_ferkd", 1, crops_per_image=bank,
                                                              calibrate={}, **gen)},
        "FerKD + SelfMix": {"pool": pool, "labels": store_section(out, f"{ds}_ferkd_mix", 1, crops_per_image=bank,
                                                                  calibrate={}, selfmix={"mode": "cutmix"}, **gen)},
    }
    rows, curves = [], {}
    for label, extra in methods.items():
        slug = label.lower().replace(" + ", "_").replace(" ", "_")
        gen_s, store_bytes, bands = 0.0, "", ""
        if "labels" in extra:
            g = generate_labels(parse_config(recipe(f"{ds}_{slug}", out / "students", data, epochs, seed=seeds[0],
                                                    **extra)), progress=False)
            gen_s, store_bytes = g.seconds, f"{g.manifest['bytes']:,}"
            if "band_fractions" in g.manifest:
                bands = "/".join(f"{v:.0%}" for v in g.manifest["band_fractions"].values())
        histories = [run(recipe(f"{ds}_{slug}_s{seed}", out / "students", data, epochs, seed=seed, **extra)).history
                     for seed in seeds]
        curves[label] = [{"epoch": e + 1, **{k: statistics.mean(h[e][k] for h in histories)
                                             for k in ("test_top1", "train_loss")}} for e in range(epochs)]
        rows.append([label, mean_std([h[-1]["test_top1"] for h in histories]),
                     mean_std([max(r["test_top1"] for r in h) for h in histories]),
                     f"{statistics.mean(r['epoch_seconds'] for h in histories for r in h):.1f}",
                     histories[0][-1]["teacher_queries"], f"{gen_s:.0f}", store_bytes, bands])
        print(f"[{ds}] {label}: top-1 {rows[-1][1]}")
    return rows, curves, pool, teacher.final["test_top1"]


# --------------------------------------------------------------------------------------------- P1


def epoch_cost(ds: str, data: dict, out: Path, pool: dict, rounds: int):
    """One epoch per variant per round, all variants advanced in lockstep (always the one furthest
    behind, by fraction of its epoch), so load from other processes on this machine hits them alike.
    A step is the trainer's: load batch → labeler → student forward/backward → SGD step; a store's
    first step includes reading and verifying its epoch."""
    import shutil

    from torch.utils.data import DataLoader

    from distill.augment import RandomCrops
    from distill.teacher_pool import build_pool
    from students.build import create_step
    from teachers.labeling import LabelContext, labeling_for

    fkd = store_section(out, f"{ds}_p1_fkd", 1, crops_per_image=1, topk=5, epochs=1, batch_size=1024)
    multi = store_section(out, f"{ds}_p1_multicrop", 4, crops_per_image=4, topk=5, epochs=1, batch_size=1024)
    variants = {"hard labels": ({}, 64), "FKD store (1 view/image)": ({"pool": pool, "labels": fkd}, 64),
                "online KD (same teacher)": ({"pool": pool}, 64),
                "FKD store, multi-crop 4 views/image": ({"pool": pool, "labels": multi}, 16)}
    cfgs = {k: parse_config(recipe("p1", out / "p1", data, 1, batch=b, **extra)) for k, (extra, b) in variants.items()}
    for cfg in cfgs.values():
        if cfg.labels is not None:
            shutil.rmtree(cfg.labels.options.store, ignore_errors=True)  # fresh: the teacher may have changed
            generate_labels(cfg, progress=False)
    train_set, _ = load_data(cfgs["hard labels"].data)
    cpu = torch.device("cpu")
    totals: dict[str, list[float]] = {k: [] for k in variants}
    views: dict[str, int] = {}
    for _ in range(rounds):
        state = {}
        for label, cfg in cfgs.items():
            step = create_step(cfg, train_set).train()  # the recipe's student, seeded by cfg.seed
            aug = cfg.data.augment
            labeler = labeling_for(cfg).build(LabelContext(train_set, cpu, RandomCrops(aug.scale, aug.ratio, aug.flip),
                                                           lambda cfg=cfg: build_pool(cfg, train_set, cpu), cfg))
            gen = torch.Generator().manual_seed(0)
            loader = DataLoader(train_set, batch_size=cfg.trainer.batch_size, shuffle=True, generator=gen, drop_last=True)
            state[label] = {"it": iter(loader), "n": len(loader), "done": 0, "s": 0.0, "views": 0, "gen": gen,
                            "step": step, "labeler": labeler, "opt": torch.optim.SGD(step.parameters(), lr=0.05, momentum=0.9)}
        while any(v["done"] < v["n"] for v in state.values()):
            label = min((k for k, v in state.items() if v["done"] < v["n"]), key=lambda k: state[k]["done"] / state[k]["n"])
            v = state[label]
            t = time.perf_counter()
            images, targets, index = next(v["it"])
            batch = v["labeler"](images.float().div_(255), targets, index, 0, v["gen"])
            terms = v["step"](batch.images, batch.targets, batch.soft)
            v["opt"].zero_grad(set_to_none=True)
            terms["loss"].backward()
            v["opt"].step()
            v["s"] += time.perf_counter() - t
            v["done"] += 1
            v["views"] += len(batch.images)
        for label, v in state.items():
            totals[label].append(v["s"])
            views[label] = v["views"]
    base = min(totals["hard labels"])
    rows = []
    for label in variants:
        best = min(totals[label])
        rows.append([label, f"{best:.2f}", " ".join(f"{t:.2f}" for t in totals[label]), f"{best / base:.3f}",
                     f"{statistics.median(totals[label]) / statistics.median(totals['hard labels']):.3f}",
                     views[label], f"{1000 * best / views[label]:.2f}"])
    return rows


# ---------------------------------------------------------------------------------------------- B


def store_bytes(out: Path, quick: bool):
    """Measured bytes per crop for k = 1, 5, 10, full at 10 and 1,000 classes (M = 4, 1 shard)."""
    n = 256 if quick else 512
    g = torch.Generator().manual_seed(0)
    rows = []
    for classes in (10, 1000):
        names = tuple(f"class{i}" for i in range(classes))
        x = torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
        data = (ImageSet(x, torch.arange(n) % classes, names), ImageSet(x[:8], torch.arange(8) % classes, names))
        for k in ((1, 5, "full") if classes == 10 else (1, 5, 10, "full")):  # k = 10 of 10 classes is full
            for variant, gen_extra in (("FKD", {}), ("FerKD + SelfMix", {"calibrate": {}, "selfmix": {"mode": "cutmix"}})):
                if variant != "FKD" and k != 5:
                    continue
                raw = recipe(f"bytes_{classes}_{k}_{len(gen_extra)}", out / "bytes", {"source": "digits", "image_size": 16}, 1,
                             pool={"teachers": [{"name": "untrained", "model": STUDENT}]},
                             labels={"store": str(out / "stores" / f"bytes_c{classes}_k{k}_{len(gen_extra)}"),
                                     "generate": {"crops_per_image": 4, "topk": k, "epochs": 1, "shard_images": n,
                                                  "batch_size": 1024, **gen_extra}})
                m = generate_labels(parse_config(raw), data=data, progress=False).manifest
                per_crop = m["bytes_per_crop"]
                rows.append([classes, k, variant, f"{per_crop:.1f}", f"{per_crop * 4:.1f}",
                             f"{per_crop * IMAGENET_IMAGES * IMAGENET_EPOCHS * 4 / 1e9:,.1f}",
                             f"{per_crop * IMAGENET_IMAGES * IMAGENET_EPOCHS * 16 / 1e9:,.1f}"])
    return rows


def mnist_subset(path: Path, n_train: int, n_test: int, out: Path) -> Path:
    """A class-balanced random subset (seed 0) as its own .npz: mnist10k is sorted by class, so
    `data.train_limit` (the first N images) would be one class."""
    import numpy as np

    dest = out / f"mnist_{n_train}_{n_test}.npz"
    if dest.exists():
        return dest
    z = np.load(path, allow_pickle=False)
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        y = z[f"y_{split}"]
        pick = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: n // 10] for c in range(10)])
        pick = rng.permutation(pick)
        arrays[f"x_{split}"], arrays[f"y_{split}"] = z[f"x_{split}"][pick], y[pick]
    out.mkdir(parents=True, exist_ok=True)
    np.savez(dest, **arrays)
    return dest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small budget (a couple of minutes)")
    p.add_argument("--data", default="../shared/data/mnist10k.npz", help="MNIST-10k .npz")
    p.add_argument("--out", default=None, help="default runs/bench_fkd (runs/bench_fkd_quick with --quick)")
    p.add_argument("--seeds", default=None, help="student seeds, comma-separated (default 0; 0,1 without --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a shared, loaded CPU, waking a second thread for "
                        "each small op costs more than it saves and makes timings erratic)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or ("runs/bench_fkd_quick" if args.quick else "runs/bench_fkd"))
    q = args.quick
    epochs, teacher_epochs, bank, rounds = (3, 5, 12, 2) if q else (8, 8, 12, 3)
    n_mnist = (1000, 1000) if q else (2000, 2000)
    seeds = [int(x) for x in (args.seeds or ("0" if q else "0,1")).split(",")]
    mnist = mnist_subset(Path(args.data), *n_mnist, out)
    datasets = {"digits": {"source": "digits", "image_size": 16, **({"train_limit": 600} if q else {})},
                "mnist": {"source": "npz", "path": str(mnist.resolve()), "image_size": 16}}
    start = time.perf_counter()

    results, pools = {}, {}
    for ds, data in datasets.items():
        results[ds] = accuracy(ds, data, out, teacher_epochs, epochs, bank, seeds)
        pools[ds] = results[ds][2]
    p1 = epoch_cost("mnist", datasets["mnist"], out, pools["mnist"], rounds)
    nbytes = store_bytes(out, q)

    print(f"\n=== P1: one student epoch ({STUDENT}, MNIST-10k subset of {n_mnist[0]} train images, "
          f"16 px, 64 views/step, CPU, {args.threads} thread(s); {rounds} rounds, variants stepped in lockstep) ===")
    print(text_table(["labels", "epoch s (min)", "rounds", "ratio vs hard (min)", "ratio (median)", "views/epoch",
                      "ms per view"], p1))
    print("goal: FKD store / hard labels <= 1.05")

    print("\n=== Store bytes (measured from written stores; M = 4 crops per image-epoch, top-k fp16 + int16 ids,"
          " fp16 boxes, 1 flip byte; 'full' = dense fp16, no ids) ===")
    print(text_table(["classes", "k", "store", "B/crop", "B/image-epoch (M=4)",
                      "ImageNet-1K GB (M=4, 300 ep)", "ImageNet-1K GB (M=16 bank)"], nbytes))

    for ds, (rows, curves, _, t_top1) in results.items():
        n_train = {"digits": datasets["digits"].get("train_limit", 1437), "mnist": n_mnist[0]}[ds]
        print(f"\n=== Accuracy on {ds} ({n_train} train images, {epochs} epochs, seeds "
              f"{seeds}; teacher {TEACHER} top-1 {t_top1:.2f}; stores: 1 view/image/epoch replayed; FerKD bank "
              f"{bank} crops/image-epoch) ===")
        print(text_table(["labels", "final top-1", "best top-1", "epoch s", "teacher queries in training",
                          "store gen s", "store bytes", "FerKD bands hard/cal/keep/easy"], rows))
        plot_curves(out / f"accuracy_{ds}.png", curves, keys=("test_top1", "train_loss"))
        print(f"plot: {out / f'accuracy_{ds}.png'}")
    (out / "results.json").write_text(json.dumps({"p1": p1, "bytes": nbytes,
                                                   "accuracy": {ds: r[0] for ds, r in results.items()}}, indent=1))
    print(f"\ntotal {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
