"""Hinton KD, side by side with torchdistill, in one process tree (one side after another).

Data: ../shared/data/mnist10k.npz (train 8,000 / test 2,000, 28 px, 1 channel). Teacher: timm
resnet18 trained once here with `distill.train` (no pool); both sides load that same safetensors
file. Student: timm mobilenetv3_small_050, 15 epochs, SGD (lr 0.05, momentum 0.9, wd 5e-4), cosine
per epoch, batch 128 (last partial batch dropped on both sides), Hinton KD T = 4, 0.9 soft + 0.1 hard.
Our student and its batches are in channels_last (`data.loader.channels_last`; `--no-channels-last`
for torchdistill's layout; docs/performance.md has both). No augmentation on either side (ours:
`data.augment` scale (1, 1), ratio (1, 1), no flip, so the "crop" is the whole 28 px image; theirs:
a pre-normalised in-memory tensor dataset). Both sides evaluate top-1 on the 2,000 test images after
every epoch (our trainer always does; torchdistill's example script does too).

Runs, each in its own subprocess, one after another (nothing else should run on the machine):
  teacher          ours, `distill.train`, hard labels (once, shared)
  td_kd            torchdistill 1.1.5: `get_distillation_box` with a config dict (WeightedSumLoss ⊃
                   KDLoss T 4 alpha 0.1 (its CE weight) → 0.9 KL + 0.1 CE), its pre/forward/post
                   processes, the epoch loop of its examples/torchvision/image_classification.py
  ours_online      `distill.train` with pool.teachers = [the resnet18], loss kd: kl, T 4
  ours_store       `distill.labels` (1 label epoch, 1 crop = the whole image, dense fp16 labels) +
                   `distill.train` replaying it; the generation counts in our wall time
  ours_hard        `distill.train`, no teacher, hard CE (the per-epoch cost a store replay should match)

Loss weights: our step computes `kd + hard_ce · CE` (students/step.py), so 0.9·KD + 0.1·CE is
(0.9·KD + 0.1·CE) / 0.9 with hard_ce = 1/9, trained with lr × 0.9 and weight decay / 0.9: for SGD
with momentum that is the same update sequence exactly (lr·(∇L/0.9 + wd'·w) = 0.9·lr0·∇L/0.9 + lr0·wd0·w).

Environment for torchdistill (benchmark-only, not a project dependency); the script makes it when
missing:
    python3 -m venv /tmp/tdvenv
    echo /work/main/.venv/lib/python3.11/site-packages \
        > /tmp/tdvenv/lib/python3.11/site-packages/_distill_venv.pth   # share torch/timm/numpy/scipy
    /tmp/tdvenv/bin/pip install --no-deps torchdistill==1.1.5

Run (2 threads for every side):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/vs_torchdistill.py --seeds 0 1 2 --also-fp32
        [--compile]      our runs with trainer.compile: true (torch.compile; the first epoch compiles)
        [--summarize]    reprint the table of an existing --json, running nothing
Writes benchmarks/results/vs_torchdistill.json (mean, median and best over seeds: this machine's
speed drifts between runs) and prints the table. Each side's wall time is measured inside its own
process from data loading to the last evaluation (imports excluded; `process_wall_s` includes them).
teacher_s: ours from metrics (`teacher_seconds`), or the store's generation wall; theirs, the
teacher's forward timed by a wrapper. student_s: the train loop's seconds minus teacher_s.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = (ROOT.parent / "shared" / "data" / "mnist10k.npz").resolve()
TDVENV = Path(os.environ.get("TDVENV", "/tmp/tdvenv"))
TD_VERSION = "1.1.5"
EPOCHS = int(os.environ.get("BENCH_EPOCHS", "15"))  # 15; smaller only for a smoke test
BATCH, LR, WD, T, SOFT, HARD = 128, 0.05, 5e-4, 4.0, 0.9, 0.1
NO_AUG = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "flip": False}


def ensure_tdvenv() -> Path:
    py = TDVENV / "bin" / "python"
    if py.exists() and subprocess.run([str(py), "-c", "import torchdistill"], capture_output=True).returncode == 0:
        return py
    subprocess.run(["python3", "-m", "venv", str(TDVENV)], check=True)
    site = next((TDVENV / "lib").glob("python3*/site-packages"))
    ours = next((ROOT / ".venv" / "lib").glob("python3*/site-packages"))
    (site / "_distill_venv.pth").write_text(f"{ours}\n")
    subprocess.run([str(TDVENV / "bin" / "pip"), "install", "-q", "--no-deps", f"torchdistill=={TD_VERSION}"], check=True)
    return py


# ------------------------------------------------------------------ our side (in a child process)
def base_recipe(name: str, seed: int, model: str) -> dict:
    return {"name": name, "seed": seed,
            "data": {"source": "npz", "path": str(DATA), "image_size": 28, "augment": NO_AUG,
                     # the student (and its batches) in channels_last: 0.28-0.40× the step time of this
                     # depthwise-conv student on this CPU (docs/performance.md); --no-channels-last: off
                     "loader": {"channels_last": os.environ.get("BENCH_CHANNELS_LAST", "1") == "1"}},
            "student": {"model": model},
            "optim": {"name": "sgd", "lr": LR, "momentum": 0.9, "weight_decay": WD, "schedule": "cosine"},
            "trainer": {"epochs": EPOCHS, "batch_size": BATCH, "num_workers": 0,
                        # --compile: torch.compile student (+ teachers); not for the teacher's own training
                        "compile": os.environ.get("BENCH_COMPILE") == "1" and model != "resnet18"},
            "log": {"every_seconds": 3600}}


def kd_recipe(name: str, seed: int, teacher: str, precision: str) -> dict:
    r = base_recipe(name, seed, "mobilenetv3_small_050")
    r["pool"] = {"teachers": [{"name": "resnet18", "model": "resnet18", "checkpoint": teacher}], "precision": precision}
    r["loss"] = {"kd": "kl", "temperature": T, "hard_ce": HARD / SOFT}
    r["optim"].update(lr=LR * SOFT, weight_decay=WD / SOFT)  # the same SGD updates as 0.9·KD + 0.1·CE
    return r


def run_summary(res, wall: float, extra_teacher: float = 0.0) -> dict:
    hist = res.history
    train_s = sum(h["epoch_seconds"] for h in hist)
    teacher_s = hist[-1].get("teacher_seconds", 0.0)
    return {"wall_s": wall, "train_loop_s": train_s, "teacher_s": teacher_s + extra_teacher,
            "student_s": train_s - teacher_s, "student_s_per_epoch": (train_s - teacher_s) / len(hist),
            "eval_and_other_s": wall - train_s - extra_teacher, "top1": hist[-1]["test_top1"],
            "top1_curve": [h["test_top1"] for h in hist], "run_dir": str(res.run_dir)}


def child_ours(kind: str, seed: int, out: Path, teacher: str | None, precision: str) -> dict:
    import torch

    import distill
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if kind == "teacher":
        r = base_recipe("teacher_resnet18", seed, "resnet18")
        r["trainer"]["epochs"] = int(os.environ["TEACHER_EPOCHS"])
        start = time.perf_counter()
        res = distill.train(r, out_dir=str(out))
        s = run_summary(res, time.perf_counter() - start)
        s["checkpoint"] = str(res.run_dir / "student.safetensors")
        return s
    if kind == "hard":
        start = time.perf_counter()
        res = distill.train(base_recipe(f"hard_s{seed}", seed, "mobilenetv3_small_050"), out_dir=str(out))
        return run_summary(res, time.perf_counter() - start)
    if kind == "online":
        start = time.perf_counter()
        res = distill.train(kd_recipe(f"online_{precision}_s{seed}", seed, teacher, precision), out_dir=str(out))
        return run_summary(res, time.perf_counter() - start)
    if kind == "store":
        r = kd_recipe(f"store_{precision}_s{seed}", seed, teacher, precision)
        store = out / f"store_{precision}_s{seed}"
        # no augmentation: the teacher's label of an image is the same every epoch, so ONE label epoch
        # replayed 15 times is exactly the online run's labels (up to fp16 storage)
        r["labels"] = {"source": "store", "store": str(store), "crops_per_image": 1,
                       "generate": {"epochs": 1, "crops_per_image": 1, "topk": "full"}}
        start = time.perf_counter()
        lab = distill.labels(r, out_dir=str(out), progress=False)
        gen_s = time.perf_counter() - start
        res = distill.train(r, out_dir=str(out))
        s = run_summary(res, time.perf_counter() - start, extra_teacher=gen_s)
        s.update(generate_s=gen_s, store_bytes=lab.manifest.get("total_bytes") if isinstance(lab.manifest, dict) else None)
        return s
    raise ValueError(kind)


# ------------------------------------------------------------------ torchdistill's side (child, its venv)
def child_torchdistill(seed: int, teacher: str, mean: float, std: float) -> dict:
    import numpy as np
    import timm
    import torch
    import torch.nn as nn
    from safetensors.torch import load_file
    from torch.utils.data import RandomSampler, SequentialSampler, TensorDataset

    import torchdistill
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.datasets.registry import register_dataset

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    torch.manual_seed(seed)
    start = time.perf_counter()

    @register_dataset
    def mnist10k(split: str):  # torchdistill's dataset registry; pre-normalised like Normalize((0.5,), (0.5,))
        d = np.load(DATA)
        x = (torch.from_numpy(d[f"x_{split}"]).float().div_(255).unsqueeze(1) - mean) / std
        return TensorDataset(x, torch.from_numpy(d[f"y_{split}"]).long())

    from torchdistill.datasets.registry import DATASET_DICT
    dataset_dict = {"mnist10k/train": DATASET_DICT["mnist10k"]("train"), "mnist10k/test": DATASET_DICT["mnist10k"]("test")}

    class TimedTeacher(nn.Module):  # the teacher's forward, timed (for teacher-seconds only)
        def __init__(self, net):
            super().__init__()
            self.net, self.seconds = net, 0.0

        def forward(self, x):
            t0 = time.perf_counter()
            y = self.net(x)
            self.seconds += time.perf_counter() - t0
            return y

    tnet = timm.create_model("resnet18", num_classes=10, in_chans=1)
    tnet.load_state_dict(load_file(teacher))
    teacher_model = TimedTeacher(tnet).eval()
    student_model = timm.create_model("mobilenetv3_small_050", num_classes=10, in_chans=1)
    train_config = {  # the layout of torchdistill's configs/sample/*/kd/*.yaml `train:` section
        "num_epochs": EPOCHS,
        "train_data_loader": {"dataset_id": "mnist10k/train", "sampler": {"class_or_func": RandomSampler, "kwargs": {}},
                              "kwargs": {"batch_size": BATCH, "num_workers": 0, "drop_last": True}},
        "val_data_loader": {"dataset_id": "mnist10k/test", "sampler": {"class_or_func": SequentialSampler, "kwargs": {}},
                            "kwargs": {"batch_size": 256, "num_workers": 0, "drop_last": False}},
        "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "forward_hook": {"input": [], "output": []}, "wrapper": None, "requires_grad": False},
        "student": {"forward_proc": "forward_batch_only", "adaptations": None, "sequential": [], "frozen_modules": [],
                    "forward_hook": {"input": [], "output": []}, "wrapper": None, "requires_grad": True},
        "optimizer": {"key": "SGD", "kwargs": {"lr": LR, "momentum": 0.9, "weight_decay": WD}},
        "scheduler": {"key": "CosineAnnealingLR", "kwargs": {"T_max": EPOCHS}},
        "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
                "teacher_module_io": "output", "temperature": T, "alpha": HARD, "reduction": "batchmean"}},
            "weight": 1.0}}}},
    }
    device = torch.device("cpu")
    box = get_distillation_box(teacher_model, student_model, dataset_dict, train_config, device, None, False, 1)

    @torch.inference_mode()
    def evaluate(model, loader) -> float:
        model.eval()
        correct = total = 0
        for x, y, *_ in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
        return 100.0 * correct / total

    curve, train_s = [], 0.0
    for epoch in range(box.num_epochs):  # examples/torchvision/image_classification.py's loop
        box.pre_epoch_process(epoch=epoch)
        t0 = time.perf_counter()
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
        train_s += time.perf_counter() - t0
        curve.append(evaluate(box.student_model, box.val_data_loader))
        box.post_epoch_process()
        print(f"[torchdistill] epoch {epoch + 1}/{box.num_epochs} top1 {curve[-1]:.2f}", flush=True)
    wall = time.perf_counter() - start
    ts = teacher_model.seconds
    return {"wall_s": wall, "train_loop_s": train_s, "teacher_s": ts, "student_s": train_s - ts,
            "student_s_per_epoch": (train_s - ts) / EPOCHS, "eval_and_other_s": wall - train_s, "top1": curve[-1],
            "top1_curve": curve, "torchdistill": torchdistill.__version__ if hasattr(torchdistill, "__version__") else TD_VERSION}


# ------------------------------------------------------------------ parent
def spawn(python: str, args: list[str], env: dict) -> tuple[dict, float]:
    start = time.perf_counter()
    p = subprocess.run([python, str(Path(__file__).resolve()), *args], env=env, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    lines = p.stdout.splitlines()
    for line in lines:
        if not line.startswith("RESULT "):
            print("   ", line, flush=True)
    if p.returncode != 0:
        raise SystemExit(f"child {args} failed ({p.returncode})")
    return json.loads(next(l for l in lines if l.startswith("RESULT "))[7:]), wall


def loadavg() -> list[float]:
    return [round(float(v), 2) for v in Path("/proc/loadavg").read_text().split()[:3]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--teacher", default=None, help=argparse.SUPPRESS)
    p.add_argument("--mean", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--std", type=float, default=0.5, help=argparse.SUPPRESS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--teacher-epochs", type=int, default=5)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16"], help="our pool.precision")
    p.add_argument("--also-fp32", action="store_true", help="also run our online KD with an fp32 teacher")
    p.add_argument("--out", default="runs/bench_vs_torchdistill")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "vs_torchdistill.json"))
    p.add_argument("--compile", action="store_true", help="our runs with trainer.compile: true (inductor)")
    p.add_argument("--no-channels-last", action="store_true",
                   help="our student in the default contiguous format (data.loader.channels_last: false)")
    p.add_argument("--summarize", action="store_true", help="reprint the table of an existing --json (no runs)")
    a = p.parse_args()
    out = (ROOT / a.out).resolve()
    if a.summarize:
        write_summary(json.loads(Path(a.json).read_text()), a.json)
        return

    if a.child == "td":
        print("RESULT " + json.dumps(child_torchdistill(a.seed, a.teacher, a.mean, a.std)), flush=True)
        return
    if a.child:
        kind, prec = (a.child.split(":") + ["bf16"])[:2]
        print("RESULT " + json.dumps(child_ours(kind, a.seed, out, a.teacher, prec)), flush=True)
        return

    threads = os.environ.get("OMP_NUM_THREADS", "2")
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "TEACHER_EPOCHS": str(a.teacher_epochs),
           "BENCH_COMPILE": "1" if a.compile else "0", "BENCH_CHANNELS_LAST": "0" if a.no_channels_last else "1"}
    if out.exists() and out.is_relative_to(ROOT / "runs"):  # fresh runs: our trainer resumes a run dir it finds
        import shutil
        shutil.rmtree(out)
    td_py = str(ensure_tdvenv())
    ours_py = str(ROOT / ".venv" / "bin" / "python")
    report: dict = {"command": " ".join(["OMP_NUM_THREADS=" + threads, ".venv/bin/python", "benchmarks/vs_torchdistill.py",
                                         *sys.argv[1:]]),
                    "machine": {"cpus": os.cpu_count(), "omp_num_threads": int(threads), "load_before": loadavg()},
                    "recipe": {"epochs": EPOCHS, "batch": BATCH, "lr": LR, "weight_decay": WD, "momentum": 0.9,
                               "schedule": "cosine per epoch", "T": T, "soft": SOFT, "hard": HARD,
                               "augmentation": "none on either side", "teacher_epochs": a.teacher_epochs,
                               "our_pool_precision": a.precision, "our_trainer_compile": a.compile,
                               "our_student_channels_last": not a.no_channels_last, "our_num_workers": 0, "their_num_workers": 0,
                               "our_loss": f"kl·T² + {HARD / SOFT:.4f}·CE at lr {LR * SOFT:.4f}, wd {WD / SOFT:.3e} (≡ 0.9/0.1)",
                               "store": "1 label epoch × 1 crop (whole image) × dense fp16, replayed every epoch"},
                    "runs": {}}
    print(f"load before: {report['machine']['load_before']}", flush=True)
    print("== teacher (ours, once)", flush=True)
    teacher, tw = spawn(ours_py, ["--child", "teacher", "--seed", "0", "--out", a.out], env)
    teacher["process_wall_s"] = tw
    report["teacher"] = teacher
    ckpt = teacher["checkpoint"]
    print(f"   teacher top1 {teacher['top1']:.2f} in {teacher['wall_s']:.1f}s", flush=True)

    modes = [("td_kd", td_py, "td"), ("ours_online", ours_py, f"online:{a.precision}")]
    if a.also_fp32 and a.precision != "fp32":
        modes.append(("ours_online_fp32", ours_py, "online:fp32"))
    modes += [("ours_store", ours_py, f"store:{a.precision}"), ("ours_hard", ours_py, "hard")]
    for seed in a.seeds:
        for name, py, child in modes:
            print(f"== {name} seed {seed}  (load {loadavg()})", flush=True)
            r, w = spawn(py, ["--child", child, "--seed", str(seed), "--teacher", ckpt, "--out", a.out], env)
            r.update(process_wall_s=w, load_after=loadavg())
            report["runs"].setdefault(name, []).append(r)
            print(f"   {name}: wall {r['wall_s']:.1f}s teacher {r['teacher_s']:.1f}s student {r['student_s']:.1f}s "
                  f"top1 {r['top1']:.2f}", flush=True)
    report["machine"]["load_after"] = loadavg()
    write_summary(report, a.json)


def write_summary(report: dict, path: str) -> None:
    """Table + ratios. The machine's speed drifts between runs (seen: whole runs at 1.5× the
    epoch time of the run before), so every statistic is given over the seeds as mean, median and
    best (fastest run of each mode); accuracy is the mean over seeds."""
    import statistics

    runs = report["runs"]
    stats = {"mean": statistics.mean, "median": statistics.median, "best": min}

    def agg(name: str, key: str, how: str = "mean") -> float:
        return stats[how]([r[key] for r in runs[name]])

    n_seeds = len(runs["td_kd"])
    for how in stats:
        print(f"\n[{how} of {n_seeds} seed(s); top1 = mean]")
        print(f"{'run':18s} {'wall s':>8s} {'teacher s':>10s} {'student s':>10s} {'stud s/ep':>10s} {'top1':>7s}")
        for n in runs:
            print(f"{n:18s} {agg(n, 'wall_s', how):8.1f} {agg(n, 'teacher_s', how):10.1f} {agg(n, 'student_s', how):10.1f} "
                  f"{agg(n, 'student_s_per_epoch', how):10.2f} {agg(n, 'top1'):7.2f}")
    summary: dict = {"seeds": n_seeds, "note": "wall ratio = ours / torchdistill; mean, median and best over seeds"}
    for n in ("ours_online", "ours_online_fp32", "ours_store"):
        if n in runs:
            d = {f"wall_ratio_{how}": agg(n, "wall_s", how) / agg("td_kd", "wall_s", how) for how in stats}
            d["top1_mean_minus_theirs"] = agg(n, "top1") - agg("td_kd", "top1")
            d["goal_met_median"] = d["wall_ratio_median"] <= 0.8 and d["top1_mean_minus_theirs"] >= 0
            summary[n] = d
            print(f"{n}: wall ours/theirs = {d['wall_ratio_mean']:.3f} mean, {d['wall_ratio_median']:.3f} median, "
                  f"{d['wall_ratio_best']:.3f} best (goal ≤ 0.8); top1 Δ = {d['top1_mean_minus_theirs']:+.2f} → "
                  f"{'MET' if d['goal_met_median'] else 'NOT met'}")
    # store replay vs hard labels, per epoch: also per seed, since the two ran back to back
    per_seed = [s["student_s_per_epoch"] / h["student_s_per_epoch"] for s, h in zip(runs["ours_store"], runs["ours_hard"])]
    summary["store_replay_vs_hard_per_epoch"] = {
        **{f"store_s_per_epoch_{how}": agg("ours_store", "student_s_per_epoch", how) for how in stats},
        **{f"hard_s_per_epoch_{how}": agg("ours_hard", "student_s_per_epoch", how) for how in stats},
        "ratio_per_seed": per_seed}
    print("store replay / hard-label student s per epoch: "
          + ", ".join(f"{how} {agg('ours_store', 'student_s_per_epoch', how):.2f}/{agg('ours_hard', 'student_s_per_epoch', how):.2f}"
                      for how in stats) + "; per seed " + ", ".join(f"{r:.3f}" for r in per_seed))
    report["summary"] = summary
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
