"""Which students gain from channels_last (`data.loader.channels_last`) on this machine, and what
bf16 autocast does to them: one SGD train step (forward, CE, backward, step) per model, in five
settings — NCHW or channels_last × fp32 or bf16 autocast, and fp32 with the batches alone in
channels_last (weights contiguous: what the flag does under DeepSpeed) — interleaved round by
round, median of the rounds. Teachers are timed the same way, as inference under
`torch.inference_mode`.

Run (nothing else running; 2 threads):
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/memory_format.py [--rounds 5] [--steps 8]
Prints one table and writes benchmarks/results/memory_format.json. It measures, it asserts nothing:
the point is to choose the flag per model (depthwise-conv students gain most on CPU; ResNets on
GPUs under bf16, see benchmarks/results/gpu_check_h100_channels_last.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
# (model, image size, channels, batch, role): the students of our CPU recipes and benchmarks, and the
# vs_torchdistill teacher
CASES = [("mobilenetv3_small_050", 28, 1, 128, "train"), ("mobilenetv3_small_050", 32, 3, 64, "train"),
         ("resnet18", 28, 1, 128, "train"),
         ("test_byobnet", 8, 1, 64, "train"), ("test_resnet", 32, 3, 64, "train"), ("test_efficientnet", 32, 3, 64, "train"),
         ("test_convnext", 32, 3, 64, "train"), ("test_vit", 32, 3, 64, "train"), ("resnet18", 28, 1, 128, "infer")]
# (precision, layout): "nchw", "channels_last" (weights and batches), "batches" (batches only)
SETTINGS = [("fp32", "nchw"), ("fp32", "channels_last"), ("bf16", "nchw"), ("bf16", "channels_last"),
            ("fp32", "batches")]


def timer(name: str, size: int, chans: int, batch: int, role: str, precision: str, layout: str):
    """A closure running `steps` steps of one case in one setting (its own model and optimiser, so
    no state crosses layouts); returns seconds per step."""
    torch.manual_seed(0)
    weights = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    batches = torch.contiguous_format if layout == "nchw" else torch.channels_last
    model = timm.create_model(name, num_classes=10, in_chans=chans).to(memory_format=weights).train(role == "train")
    x, y = torch.randn(batch, chans, size, size).contiguous(memory_format=batches), torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                if role == "infer":
                    with torch.inference_mode():
                        model(x)
                    continue
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - start) / steps

    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "memory_format.json"))
    a = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows = []
    print(f"{'model':22s} {'px':>3s} {'ch':>2s} {'role':5s} " + " ".join(f"{p}/{lay}".rjust(20) for p, lay in SETTINGS)
          + "   cl/nchw fp32", flush=True)
    for case in CASES:
        runs = {s: timer(*case, *s) for s in SETTINGS}
        for run in runs.values():
            run(2)  # warm-up: oneDNN primitives are built on the first calls
        ms = {s: [] for s in SETTINGS}
        for _ in range(a.rounds):
            for s, run in runs.items():
                ms[s].append(1e3 * run(a.steps))
        med = {f"{p}_{lay}": statistics.median(v) for (p, lay), v in ms.items()}
        ratio = med["fp32_channels_last"] / med["fp32_nchw"]
        rows.append({"model": case[0], "image_size": case[1], "channels": case[2], "batch": case[3], "role": case[4],
                     "ms_per_step_median": med, "channels_last_over_nchw_fp32": ratio})
        print(f"{case[0]:22s} {case[1]:3d} {case[2]:2d} {case[4]:5s} " + " ".join(f"{v:20.1f}" for v in med.values())
              + f"   {ratio:.2f}", flush=True)
    out = {"command": f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '2')} .venv/bin/python benchmarks/memory_format.py "
                      f"--rounds {a.rounds} --steps {a.steps}",
           "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
