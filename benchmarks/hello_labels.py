"""HeLlO label projectors vs the label sources they replace, on digits and MNIST at IPC 10 / 50.

    .venv/bin/python benchmarks/hello_labels.py --quick
    .venv/bin/python benchmarks/hello_labels.py [--datasets digits,mnist] [--ipcs 10,50] [--seeds 3] \
        [--ranks 4,1,16] [--heads prototype,random] [--image-opt]

1. teacher: test_resnet trained on the target data (configs/synth/teacher_{digits,mnist}.yaml);
2. "foundation" encoder: the test_resnet `distill train` fits on the *other* dataset (MNIST for
   digits, digits for MNIST: never the target data, never this target's teacher), read as an
   engine checkpoint without its classifier (`labels.projector.kind: engine`);
3. one DM synthesis per projector variant, `labels.mode: projector` (synth.hello); variants: the
   main one (first rank, first head), then the other ranks, the other head inits, image-opt on;
4. fresh ConvNet-3 students (final epoch, `--seeds` seeds) on the same distilled images with
   hard labels (DSA), stored soft labels (the relabel store, one label epoch per student epoch),
   the online teacher, and the projector, plus the bytes each label source ships;
5. projector bytes / stored-label bytes here, and extrapolated to ImageNet-1K IPC 10 (ViT-B-32
   CLIP image tower, LoRA on its default targets + head; 300 label epochs, top-10 and dense) from
   measured per-parameter and per-label sizes.
Measures; asserts nothing. Everything is cached under --out.
"""
from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill.artefacts import atomic_path, write_text  # noqa: E402
from distill.recipe import parse_synth_config  # noqa: E402
from distill.report import text_table  # noqa: E402

OPS = ["color", "crop", "cutout", "scale", "rotate"]


def train_teacher(dataset: str, mnist: Path, out: Path, epochs: int) -> Path:
    from distill.recipe import load_config
    from distill.runner import train

    cfg = load_config(ROOT / f"configs/synth/teacher_{dataset}.yaml",
                      [f"out_dir={out}", f"trainer.epochs={epochs}"] + ([f"data.path={mnist}"] if dataset == "mnist" else []))
    path = cfg.run_dir / "student.safetensors"
    if not path.is_file():
        train(cfg)
    return path


def data_section(dataset: str, mnist: Path) -> dict:
    return {"source": "digits", "image_size": 16} if dataset == "digits" else \
        {"source": "npz", "path": str(mnist), "image_size": 16}


def recipe(out: Path, name: str, data: dict, ipc: int, teacher: Path, enc: Path, iterations: int, label_epochs: int,
           rank: int, head: str, steps: int, image_opt: bool, epochs: int, seeds: int):
    return parse_synth_config({
        "name": name, "out_dir": str(out / "synth"), "seed": 0, "data": data,
        "ipc": ipc, "method": "distribution_matching", "options": {"batch_real": 64, "dsa_ops": OPS},
        "iterations": iterations, "init": {"kind": "real"},
        "teachers": [{"model": "test_resnet", "checkpoint": str(teacher)}],
        "labels": {"mode": "projector",
                   "relabel": {"epochs": label_epochs, "crops_per_image": 1, "topk": 5, "scale": [0.5, 1.0]},
                   "projector": {"kind": "engine", "model": "test_resnet", "checkpoint": str(enc),
                                 "head_init": head, "lora_rank": rank, "lora_alpha": 2.0 * rank,
                                 "steps": steps, "lr": 1e-2, "schedule": "cosine", "batch_size": 64,
                                 "real_per_class": 10,
                                 "image_opt": {"enabled": image_opt, "steps": 50}}},
        "eval": {"students": ["convnet3"], "seeds": seeds, "epochs": epochs, "batch_size": 256, "dsa_ops": OPS,
                 "full_data": False}})


def arms(art, cfg, teachers, out: Path, dev, which: list[str]):
    """(name, labeler, bytes) for each label source on the distilled images."""
    from distill.augment import RandomCrops
    from synth.eval_synth import hard_labeler
    from synth.hello import TrainableLabels, projector_labeler
    from synth.relabel import relabel_store, store_labeler
    from teachers.pool import EnsemblePool
    from teachers.source import OnlineLabeler

    rc, protocol = cfg.labels.relabel, cfg.eval
    for name in which:
        if name == "hard":
            norm = tuple(torch.tensor(art.manifest["normalisation"][k]) for k in ("mean", "std"))  # as eval-synth
            yield name, hard_labeler(protocol, art.images, norm), 8 * len(art.images)
        elif name == "stored soft":
            root = out / "stores" / art.root.name
            relabel_store(root, art.images, teachers, rc, cfg.seed, cfg.hash(), dev, progress=False)
            yield name, *store_labeler(root, art.images, rc.decode)
        elif name == "online teacher":
            src = TrainableLabels(EnsemblePool(teachers).to(dev))
            yield name, OnlineLabeler(RandomCrops(tuple(rc.scale), tuple(rc.ratio), rc.flip), src), \
                cfg.teachers[0].checkpoint.stat().st_size
        else:
            yield name, *projector_labeler(art, rc, dev)


def ship_bytes_per_crop(store_root: Path) -> tuple[dict[str, float], float]:
    """Per-crop bytes of each stored tensor (values/indices per kept class), and header bytes per shard."""
    from safetensors import safe_open

    shard = sorted((store_root / "shards").glob("*.safetensors"))[0]
    with safe_open(str(shard), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
    crops = t["boxes"].shape[0] * t["boxes"].shape[1]
    per = {k: v.numel() * v.element_size() / crops for k, v in t.items()}
    blob = shard.read_bytes()
    return per, 8 + struct.unpack("<Q", blob[:8])[0]


def in1k_projector(rank: int, bytes_per_param: float, header_per_tensor: float) -> tuple[int, int, float]:
    """LoRA parameters of the ViT-B-32 CLIP image tower (default targets) + a 1000-class head
    (text head: regenerated, not stored), and the bytes they take at the measured sizes."""
    from synth.projector import ProjectorConfig, apply_lora, build_encoder, build_projector

    cfg = ProjectorConfig(kind="open_clip", model_name="ViT-B-32", lora_rank=rank, head_init="random")
    base = build_encoder(cfg)
    proj = apply_lora(build_projector(cfg, [str(i) for i in range(1000)], base=base))
    lora = proj.lora_state_dict()
    params = sum(p.numel() for p in lora.values())
    return params, len(lora), params * bytes_per_param + len(lora) * header_per_tensor


def measure(art, cfg, m, test, teachers, out: Path, which: list[str], label_of, seeds: int, epochs: int, dev):
    """Final-epoch top-1 of fresh ConvNet-3 students per label source: {label: record}."""
    from synth.eval_synth import train_student

    res = {}
    for arm, labeler, nbytes in arms(art, cfg, teachers, out, dev, which):
        accs = [train_student("convnet3", s, art.images, test, labeler, epochs, cfg.eval, cfg.data,
                              out / "students" / cfg.name / arm.replace(" ", "_") / f"seed{s}", "cpu")[0]
                for s in range(seeds)]
        rec = {"final_top1": accs, "mean": statistics.fmean(accs),
               "std": statistics.pstdev(accs) if len(accs) > 1 else 0.0, "label_bytes": nbytes}
        if arm == "projector":
            rec |= {"fit": m["fit"], "projector": m["projector"], "image_opt": m.get("image_opt")}
        res[label_of(arm)] = rec
        print(f"  {cfg.name} {label_of(arm)}: {accs}", flush=True)
    return res


def plot_bytes(path: Path, results: dict) -> None:
    """Accuracy vs label bytes (log x), one panel per dataset × IPC."""
    from distill.report import _plt

    plt = _plt()  # the engine's headless matplotlib
    keys = list(results)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, r in results[key].items():
            ax.errorbar(r["label_bytes"], r["mean"], yerr=r["std"], fmt="o", capsize=3)
            ax.annotate(label, (r["label_bytes"], r["mean"]), fontsize=7, xytext=(4, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set(title=key, xlabel="label bytes shipped (log)", ylabel="student top-1 (final epoch)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mnist", type=Path, default=ROOT.parent / "shared/data/mnist10k.npz")
    ap.add_argument("--out", type=Path, default=None, help="default runs/bench/hello_labels[_quick]")
    ap.add_argument("--quick", action="store_true", help="digits IPC 10 only, 2 seeds, short budgets")
    ap.add_argument("--datasets", default="digits,mnist")
    ap.add_argument("--ipcs", default="10,50")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--epochs", default=None, help="student epochs per IPC, e.g. 10:150,50:60")
    ap.add_argument("--ranks", default="4", help="LoRA ranks; the first is the main one (ablation: 4,1,16)")
    ap.add_argument("--heads", default="prototype", help="head inits; the first is the main one (ablation: prototype,random)")
    ap.add_argument("--image-opt", action="store_true", help="also measure the image-optimisation step")
    ap.add_argument("--ablate-all", action="store_true", help="ablations on every dataset × IPC (default: the first only)")
    ap.add_argument("--in1k-ranks", default="4")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.datasets, args.ipcs = "digits", "10"
    out = args.out or ROOT / "runs/bench" / ("hello_labels_quick" if args.quick else "hello_labels")
    seeds = args.seeds or (2 if args.quick else 3)
    epochs = dict(map(int, kv.split(":")) for kv in (args.epochs or ("10:60,50:30" if args.quick else "10:150,50:60")).split(","))
    iters, steps = (20, 600) if args.quick else (100, 1500)
    ranks, heads = [int(r) for r in args.ranks.split(",")], args.heads.split(",")
    t0 = time.perf_counter()

    from distill.config import DataConfig
    from distill.data import load_data
    from synth.artefact import read_artefact
    from synth.run import build_teachers, synthesize

    dev = torch.device("cpu")
    rows, results, first = [], {}, None
    for ds in args.datasets.split(","):
        source = "mnist" if ds == "digits" else "digits"
        teacher = train_teacher(ds, args.mnist, out / "teachers", 8 if args.quick else 15)
        enc = train_teacher(source, args.mnist, out / "teachers", 8 if args.quick else 15)
        data = data_section(ds, args.mnist)
        _, test = load_data(DataConfig.model_validate(data))
        print(f"{ds}: teacher {teacher} ({teacher.stat().st_size:,} B); encoder trained on {source}: {enc}", flush=True)
        for ipc in [int(i) for i in args.ipcs.split(",")]:
            ep = epochs[ipc]
            ablate = args.ablate_all or first is None
            variants = [(ranks[0], heads[0], False)]
            if ablate:
                variants += [(r, heads[0], False) for r in ranks[1:]] + [(ranks[0], h, False) for h in heads[1:]]
                variants += [(ranks[0], heads[0], True)] if args.image_opt else []
            key, cell = f"{ds} IPC{ipc}", {}
            for n, (rank, head, iopt) in enumerate(variants):
                name = f"hello_{ds}_ipc{ipc}_r{rank}_{head}{'_iopt' if iopt else ''}_e{ep}_i{iters}_s{steps}"
                cfg = recipe(out, name, data, ipc, teacher, enc, iters, ep, rank, head, steps, iopt, ep, seeds)
                m = synthesize(cfg, progress=False).manifest
                art = read_artefact(cfg.run_dir)
                train, _ = load_data(cfg.data)
                teachers = build_teachers(cfg, train, dev)
                which = ["hard", "stored soft", "online teacher", "projector"] if n == 0 else ["projector"]
                tag = f"projector r{rank} {head}{' +image-opt' if iopt else ''}"
                cell |= measure(art, cfg, m, test, teachers, out, which, lambda a: tag if a == "projector" else a,
                                seeds, ep, dev)
                first = first or (art, cfg, m)
            results[key] = cell
            for label, r in cell.items():
                extra = ""
                if "fit" in r:
                    pb, pa = r["fit"]["probe_before"], r["fit"]["probe_after"]
                    extra = (f"teacher agreement {pb['top1_agreement']:.2f}→{pa['top1_agreement']:.2f}, "
                             f"MSE {pb['mse']:.3f}→{pa['mse']:.3f}; bytes/stored "
                             f"{r['label_bytes'] / cell['stored soft']['label_bytes']:.3f}")
                rows.append([ds, ipc, label, f"{r['mean']:.2f} ± {r['std']:.2f}", f"{r['label_bytes']:,}", extra])
    header = ["data", "IPC", "label source", "top-1 (final, mean ± std)", "bytes shipped", "projector fit"]
    print(f"\nConvNet-3 students, final-epoch top-1 over {seeds} seeds, epochs by IPC {epochs}; DM {iters} iterations; "
          f"projector: test_resnet trained on the other dataset + LoRA, {steps} fit steps (AdamW 0.01, cosine)")
    table = text_table(header, rows)
    print(table)

    art, cfg, m = first
    p = m["projector"]
    print(f"\nprojector / stored soft labels ({art.root.name}): {p['bytes']:,} / {p['soft_label_bytes_replaced']:,} B = "
          f"{p['bytes_ratio']:.4f} (manifest)")
    # ImageNet-1K IPC 10 extrapolation from measured sizes
    per, _ = ship_bytes_per_crop(out / "stores" / art.root.name)
    k_here = 5
    fixed = sum(v for k, v in per.items() if k not in ("values", "indices"))
    per_class_entry = (per["values"] + per.get("indices", 0)) / k_here
    dense_entry = per["values"] / k_here  # fp16 value only (dense stores keep no indices)
    from safetensors import safe_open

    with safe_open(str(art.root / "labels/projector.safetensors"), framework="pt") as f:
        ts = {k: f.get_tensor(k) for k in f.keys()}
    lora_t = {k: v for k, v in ts.items() if "lora_" in k}
    bpp = sum(v.numel() * v.element_size() for v in lora_t.values()) / sum(v.numel() for v in lora_t.values())
    pfile = p["bytes"] - sum(v.numel() * v.element_size() for v in ts.values())
    hdr_per_tensor = pfile / len(ts)
    n_crops = 1000 * 10 * 300
    top10 = n_crops * (fixed + 10 * per_class_entry)
    dense = n_crops * (fixed + 1000 * dense_entry)
    print(f"\nmeasured: stored label per crop = {fixed:.1f} B (box+flip) + {per_class_entry:.1f} B per kept class "
          f"(top-k) / {dense_entry:.1f} B per class (dense); projector {bpp:.1f} B per LoRA parameter, "
          f"{hdr_per_tensor:.0f} B header per tensor")
    ext = []
    for r in [int(v) for v in args.in1k_ranks.split(",")]:
        params, ntens, pbytes = in1k_projector(r, bpp, hdr_per_tensor)
        ext.append([f"ViT-B-32 LoRA r{r}", f"{params:,}", f"{pbytes / 1e6:.2f} MB", f"{top10 / 1e6:.1f} MB",
                    f"{pbytes / top10:.4f}", f"{dense / 1e9:.2f} GB", f"{pbytes / dense:.5f}"])
    print("ImageNet-1K IPC 10 (10,000 images × 300 label epochs × 1 crop), extrapolated:")
    print(text_table(["projector", "LoRA params", "projector bytes", "stored top-10", "ratio", "stored dense",
                      "ratio"], ext))
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "results.json", json.dumps({"args": vars(args), "results": results, "in1k_extrapolation": ext,
                                                 "seconds": time.perf_counter() - t0}, indent=1, default=str))
    write_text(out / "report.md", f"# hello_labels\n\n`{' '.join(sys.argv)}`\n\n```\n{table}\n```\n\n"
                                  "![accuracy vs label bytes](accuracy_vs_bytes.png)\n")
    plot_bytes(out / "accuracy_vs_bytes.png", results)
    print(f"\n{time.perf_counter() - t0:.0f}s; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
