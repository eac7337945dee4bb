"""DM and DC/DSA gradient matching, ours vs the reference (VICO-UoE/DatasetCondensation), on MNIST-10k.

    git --git-dir=$(fetched mirror of VICO-UoE/DatasetCondensation) archive HEAD | tar -x -C /tmp/dc_ref
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/vs_dc_reference.py --reference /tmp/dc_ref \\
        [--methods dm,gm] [--ipcs 1,10] [--dm-iterations 20] [--gm-iterations 1:10,10:1] \\
        [--eval-models 3] [--eval-epochs 300]

Nothing is fetched at run time: `--reference DIR` is a checkout of the reference kept outside the
project (its `main_DM.py`, `main.py`, `utils.py`, `networks.py`). Data: ../shared/data/mnist10k.npz
(train 8,000 / test 2,000, 28 px). One side after the other, each synthesis in its own process:

- **reference**: its own `main_DM.py` (DM) or `main.py --method DSA` (gradient matching), run by
  this file in a child process (`--_reference SCRIPT`). Shims, nothing else changed:
  `utils.get_dataset` returns mnist10k (normalised with the reference's MNIST mean 0.1307 / std
  0.3081, as its `transforms.Normalize` does; no download); `utils.get_network` is wrapped to
  record when each iteration's network is built; CUDA is hidden (CUDA_VISIBLE_DEVICES=""), so the
  scripts pick `args.device = 'cpu'` themselves; and two fixes for current PyTorch that change no
  value (`_setitem_cloning`, `_plain_strides` below). Arguments: `--ipc`,
  `--Iteration K`, `--batch_real 256`, `--init real`, default DSA strategy (with flip), `--num_exp 1`,
  `--num_eval 0` (its in-loop evaluation off: the sets are scored below), `--eval_mode SS`.
- **ours**: `distill synth` machinery (`synth.run.synthesize`) on the same npz at 28 px, CPU,
  batch_real 256, real init, all six DSA ops, the reference's learning rates and loops.

Both sides make the same number of image updates: the reference's loop runs `Iteration + 1` times
(DM: one update each; DSA: `outer_loop` updates each, with `inner_loop` network epochs between);
ours runs that many steps. Time per update: the reference's, between consecutive network builds
(the first iteration and the last one's tail are left out), ÷ outer_loop; ours, the chunk's
synthesis seconds (init + optimisation) ÷ steps. Threads: `torch.set_num_threads` = OMP_NUM_THREADS
(default 1) on both sides.

Scoring: both synthetic sets (the reference's saved `image_syn`, already normalised; ours, the
optimiser's unclipped float images from `work/`, normalised with the reference's MNIST mean/std)
train `--eval-models` fresh ConvNet-3s each with the reference's own `utils.evaluate_synset` (its
DSA on every batch, SGD lr 0.01 momentum 0.9, ×0.1 at half time, `--eval-epochs`), tested on the
2,000 test images. Prints a table and writes benchmarks/results/vs_dc_reference.json (the rows it
ran replace the same method and IPC there; each row keeps its command); asserts nothing.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = (ROOT.parent / "shared" / "data" / "mnist10k.npz").resolve()
REF_MEAN, REF_STD = 0.1307, 0.3081  # the reference's get_dataset('MNIST') normalisation
STRATEGY = "color_crop_cutout_flip_scale_rotate"  # the reference's default DSA strategy
LOOPS = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}  # its get_loops


# --- the reference's side (imported from --reference DIR) --------------------------------------


class _Digits(torch.utils.data.Dataset):
    """(normalised image, int label) pairs, as the reference's torchvision MNIST yields them."""

    def __init__(self, images: torch.Tensor, labels: np.ndarray):
        self.images, self.labels = images, [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.images[i], self.labels[i]


def mnist10k(split: str) -> tuple[torch.Tensor, np.ndarray]:
    """Normalised images [N, 1, 28, 28] and labels of one split of the npz."""
    z = np.load(DATA)
    x = torch.from_numpy(z[f"x_{split}"]).float().div(255).unsqueeze(1)
    return (x - REF_MEAN) / REF_STD, z[f"y_{split}"]


def npz_get_dataset(dataset: str, data_path: str):
    """Stands in for the reference's `utils.get_dataset`: MNIST from the npz, no download."""
    if dataset != "MNIST":
        raise SystemExit(f"the benchmark's get_dataset serves MNIST only, not {dataset!r}")
    train, test = _Digits(*mnist10k("train")), _Digits(*mnist10k("test"))
    testloader = torch.utils.data.DataLoader(test, batch_size=256, shuffle=False, num_workers=0)
    return 1, (28, 28), 10, [str(c) for c in range(10)], [REF_MEAN], [REF_STD], train, test, testloader


def _setitem_cloning(setitem):
    """Current PyTorch refuses `t[:] = t[0]` (source and destination overlap), which the
    reference's siamese DSA does (utils.py lines 536, 550, 561, 570, 581, 592, 606-607, 628-629);
    cloning the source first is FYI's own fix of those lines and changes no value."""
    def wrapped(self, index, value):
        return setitem(self, index, value.clone() if isinstance(value, torch.Tensor) else value)
    return wrapped


def _plain_strides(diff_augment):
    """With one channel, the reference's `rand_crop` returns a tensor whose strides current PyTorch
    reads as channels_last; its ConvNet then ends in `out.view(...)` on a channels_last feature map
    and fails. Re-striding the augmented batch as plain NCHW (a view: no copy, no value changes)
    gives the layout the reference was written for."""
    def wrapped(*args, **kwargs):
        x = diff_augment(*args, **kwargs)
        return x.flatten().view(x.shape)
    return wrapped


def import_reference(ref: Path):
    """The reference's `utils`, shimmed to run on current PyTorch, with `get_dataset` served from
    the npz (before its scripts import them)."""
    torch.Tensor.__setitem__ = _setitem_cloning(torch.Tensor.__setitem__)
    sys.path.insert(0, str(ref))
    utils = importlib.import_module("utils")
    utils.get_dataset = npz_get_dataset
    utils.DiffAugment = _plain_strides(utils.DiffAugment)
    return utils


def run_reference_script(ref: Path, script: str, argv: list[str], timings: Path) -> None:
    """Child process: the reference's script, its network builds timed."""
    utils = import_reference(ref)
    builds: list[float] = []
    build = utils.get_network

    def timed_get_network(*args, **kwargs):
        builds.append(time.perf_counter())
        return build(*args, **kwargs)

    utils.get_network = timed_get_network
    main = importlib.import_module(Path(script).stem).main
    sys.argv = [script, *argv]
    main()
    timings.write_text(json.dumps({"builds": builds}))


def reference_synthesis(ref: Path, method: str, ipc: int, iterations: int, out: Path, threads: int) -> dict:
    """The reference's DM (`main_DM.py`) or DSA (`main.py --method DSA`) in a child process."""
    out.mkdir(parents=True, exist_ok=True)
    script = "main_DM.py" if method == "dm" else "main.py"
    argv = ["--dataset", "MNIST", "--model", "ConvNet", "--ipc", str(ipc), "--Iteration", str(iterations),
            "--batch_real", "256", "--init", "real", "--dsa_strategy", STRATEGY, "--num_exp", "1", "--num_eval", "0",
            "--eval_mode", "SS", "--data_path", str(out / "data"), "--save_path", str(out)]
    argv += ["--method", "DSA"] if method == "gm" else []
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_reference", script, "--reference", str(ref),
           "--threads", str(threads), "--_timings", str(out / "timings.json"), "--", *argv]
    with open(out / "log.txt", "w") as log:
        subprocess.run(cmd, check=True, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT)
    builds = json.loads((out / "timings.json").read_text())["builds"]
    outer = LOOPS[ipc][0] if method == "gm" else 1
    name = f"res_{'DM' if method == 'dm' else 'DSA'}_MNIST_ConvNet_{ipc}ipc.pt"
    images, labels = torch.load(out / name, map_location="cpu")["data"][0]
    per_update = (builds[-1] - builds[0]) / (len(builds) - 1) / outer
    return {"seconds_per_update": per_update, "updates": len(builds) * outer, "images": images, "labels": labels}


# --- our side ---------------------------------------------------------------------------------


def our_synthesis(method: str, ipc: int, updates: int, out: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from distill.artefacts import load_tensors
    from distill.recipe import parse_synth_config
    from synth.run import synthesize

    name = f"{method}_ipc{ipc}_{updates}updates"
    cfg = parse_synth_config({
        "name": name, "seed": 0, "device": "cpu", "out_dir": str(out), "keep_work": True,
        "data": {"source": "npz", "path": str(DATA), "image_size": 28}, "ipc": ipc, "iterations": updates,
        "method": "distribution_matching" if method == "dm" else "gradient_matching",
        "options": {"batch_real": 256}, "init": {"kind": "real"}})
    res = synthesize(cfg, progress=False)
    (chunk,) = res.manifest["timing"]["chunks"]
    images01 = load_tensors(next((res.root / "work").glob("*.safetensors")))[0]["images"]
    labels = torch.arange(10).repeat_interleave(ipc)
    return {"seconds_per_update": chunk["seconds"] / updates, "updates": updates,
            "images": (images01 - REF_MEAN) / REF_STD, "labels": labels}


# --- scoring with the reference's evaluate_synset ---------------------------------------------


def score(utils, images: torch.Tensor, labels: torch.Tensor, models: int, epochs: int) -> list[float]:
    """Test top-1 (%) of `models` fresh ConvNet-3s trained by the reference's `evaluate_synset`."""
    testloader = npz_get_dataset("MNIST", "")[-1]
    args = Namespace(lr_net=0.01, epoch_eval_train=epochs, batch_train=256, dsa=True, dsa_strategy=STRATEGY,
                     dsa_param=utils.ParamDiffAug(), dc_aug_param=None, device="cpu")
    accs = []
    for k in range(models):
        net = utils.get_network("ConvNet", 1, 10, (28, 28))
        accs.append(100 * utils.evaluate_synset(k, net, images.clone(), labels.clone(), testloader, args)[2])
    return accs


def per_ipc(spec: str, ipc: int) -> int:
    """'1:10,10:1' → 10 for IPC 1; a bare '3' → 3 for every IPC."""
    if ":" not in spec:
        return int(spec)
    table = {int(k): int(v) for k, v in (kv.split(":") for kv in spec.split(","))}
    if ipc not in table:
        raise SystemExit(f"--gm-iterations {spec!r} names no K for IPC {ipc}")
    return table[ipc]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", type=Path, required=True, help="a checkout of VICO-UoE/DatasetCondensation")
    p.add_argument("--methods", default="dm,gm")
    p.add_argument("--ipcs", default="1,10")
    p.add_argument("--dm-iterations", type=int, default=20, help="the reference's --Iteration for DM")
    p.add_argument("--gm-iterations", default="1:10,10:1",
                   help="the reference's --Iteration for DSA, per IPC (IPC:K,...) or one K for all")
    p.add_argument("--eval-models", type=int, default=3)
    p.add_argument("--eval-epochs", type=int, default=300)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_vs_dc_reference")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "vs_dc_reference.json")
    p.add_argument("--_reference", help=argparse.SUPPRESS)
    p.add_argument("--_timings", type=Path, help=argparse.SUPPRESS)
    p.add_argument("rest", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args._reference:
        return run_reference_script(args.reference.resolve(), args._reference, args.rest, args._timings)

    ref = args.reference.resolve()
    utils = import_reference(ref)
    rows, records = [], []
    for method in args.methods.split(","):
        for ipc in (int(i) for i in args.ipcs.split(",")):
            k = args.dm_iterations if method == "dm" else per_ipc(args.gm_iterations, ipc)
            tag = f"{method}_ipc{ipc}"
            theirs = reference_synthesis(ref, method, ipc, k, args.out / "reference" / tag, args.threads)
            ours = our_synthesis(method, ipc, theirs["updates"], args.out / "ours")
            acc = {side: score(utils, r["images"], r["labels"], args.eval_models, args.eval_epochs)
                   for side, r in (("reference", theirs), ("ours", ours))}
            ratio = ours["seconds_per_update"] / theirs["seconds_per_update"]
            rec = {"method": method, "ipc": ipc, "command": sys.argv, "eval_epochs": args.eval_epochs,
                   "eval_models": args.eval_models, "updates": ours["updates"], "threads": args.threads,
                   "reference_s_per_update": theirs["seconds_per_update"],
                   "ours_s_per_update": ours["seconds_per_update"], "ratio": ratio,
                   "reference_top1": acc["reference"], "ours_top1": acc["ours"]}
            records.append(rec)
            rows.append([{"dm": "DM", "gm": "DSA (GM)"}[method], ipc, rec["updates"],
                         f"{theirs['seconds_per_update']:.2f}", f"{ours['seconds_per_update']:.2f}", f"{ratio:.2f}x"]
                        + [f"{statistics.fmean(a):.2f} ± {statistics.pstdev(a):.2f}" for a in acc.values()])
            print(" | ".join(map(str, rows[-1])), flush=True)

    header = ["method", "IPC", "updates", "reference s/update", "ours s/update", "ours / reference",
              f"reference top-1 ({args.eval_models} models)", f"ours top-1 ({args.eval_models} models)"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    print(f"scored by the reference's evaluate_synset: ConvNet-3, its DSA, {args.eval_epochs} epochs; "
          f"{args.threads} thread(s) each side; goal ours / reference <= 0.8 with top-1 within the spread")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(args.json.read_text())["records"] if args.json.is_file() else []
    ran = {(r["method"], r["ipc"]) for r in records}
    merged = [r for r in kept if (r["method"], r["ipc"]) not in ran] + records
    args.json.write_text(json.dumps({"records": sorted(merged, key=lambda r: (r["method"], r["ipc"]))}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
