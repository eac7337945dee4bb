"""FYI (flip-aware synthesis) on and off, where its assumption holds and where it does not.

    .venv/bin/python benchmarks/fyi_flip.py --quick
    .venv/bin/python benchmarks/fyi_flip.py                   # lfw + facing + digits, DM, IPC 1/10, 3 seeds
    .venv/bin/python benchmarks/fyi_flip.py --dsa-modes plain,flip_one   # + FYI's DSA draw

FYI concatenates the synthetic batch with its mirror image inside the matching objective. That
assumes a mirrored image keeps its class ("bilateral equivalence"). Three data sets:
- `facing` (constructed here): 6 classes of objects = a body (disk / square) with a head (dot /
  spike / bar) on one side; every instance faces left or right at random (p = 0.5), shifted,
  rescaled and noised. Mirroring keeps the class; each image is asymmetric. FYI's setting.
- `lfw`: scikit-image's `lfw_subset` (100 faces, 100 non-faces, 25 px; a seeded 70/30 split per
  class). Faces keep their class when mirrored. Skipped with a note if scikit-image is absent.
- `digits`: scikit-learn's digits, where a mirrored digit is another symbol or none: FYI's
  assumption is false there, so no gain is expected (the failing case).
Each is written as an .npz and synthesised with `distill synth` machinery (DM by default, GM with
--methods), flip off and on from the same real starts, then evaluated by eval-synth's protocol
(ConvNet-3, final epoch, seeds). Δ flip = mean(flip) − mean(no flip). This script measures only.

`--dsa-modes plain,flip_one` adds an arm per DSA draw during synthesis: `plain` is DSA's single op
per draw; `flip_one` is FYI's reference DiffAugment (`dsa_mode: flip_then_one`: the random flip,
then one other op). It needs DSA's flip op, so it runs on the mirror-safe sets only. Students are
evaluated with plain DSA either way.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill.artefacts import atomic_path  # noqa: E402
from distill.recipe import parse_synth_config  # noqa: E402
from distill.report import text_table, write_benchmark_report  # noqa: E402
from synth.augment import DSA_OPS  # noqa: E402
from synth.eval_synth import eval_synth  # noqa: E402
from synth.run import synthesize  # noqa: E402

MIRROR_SAFE = {"facing": True, "lfw": True, "digits": False}


def _stroke_canvas(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def facing_objects(per_class: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Body (disk | square) × head (dot | spike | bar) on the right, then mirrored with p = 0.5."""
    yy, xx = _stroke_canvas(size)
    images, labels = [], []
    for label in range(6):
        body, head = divmod(label, 3)
        for _ in range(per_class):
            s = rng.uniform(0.8, 1.15) * size / 16
            cx, cy = size / 2 - 2 * s + rng.uniform(-1.5, 1.5), size / 2 + rng.uniform(-1.5, 1.5)
            r = 3.2 * s
            if body == 0:
                img = ((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r).astype(np.float32)
            else:
                img = ((np.abs(xx - cx) <= r) & (np.abs(yy - cy) <= r * 0.8)).astype(np.float32) * 0.8
            hx = cx + r + 2.0 * s
            if head == 0:  # a dot detached from the body
                img = np.maximum(img, ((xx - hx) ** 2 + (yy - cy + r * 0.5) ** 2 <= (1.3 * s) ** 2) * 1.0)
            elif head == 1:  # a spike: a triangle pointing away from the body
                inside = (xx >= cx + r - 0.5) & (xx <= hx + 2 * s) & (np.abs(yy - cy) <= (hx + 2 * s - xx) * 0.6)
                img = np.maximum(img, inside * 1.0)
            else:  # a vertical bar
                img = np.maximum(img, ((np.abs(xx - hx) <= 0.8 * s) & (np.abs(yy - cy) <= r * 1.1)) * 1.0)
            if rng.random() < 0.5:
                img = img[:, ::-1]
            img = np.clip(img * rng.uniform(0.7, 1.0) + rng.normal(0, 0.08, img.shape), 0, 1)
            images.append(img)
            labels.append(label)
    return (np.stack(images) * 255).round().astype(np.uint8), np.array(labels)


def split(x: np.ndarray, y: np.ndarray, test_frac: float, rng: np.random.Generator):
    tr, te = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.nonzero(y == c)[0])
        k = int(round(len(idx) * test_frac))
        te += list(idx[:k])
        tr += list(idx[k:])
    return x[tr], y[tr], x[te], y[te]


def write_npz(path: Path, x_tr, y_tr, x_te, y_te, names) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te, class_names=np.array(names))


def build_datasets(out: Path, names: list[str]) -> dict[str, dict]:
    """name → recipe `data` section; datasets that cannot be built are reported and skipped."""
    out.mkdir(parents=True, exist_ok=True)
    sections = {}
    rng = np.random.default_rng(0)
    for name in names:
        if name == "digits":
            sections[name] = {"source": "digits", "image_size": 16}
            continue
        path = out / f"{name}.npz"
        if name == "facing":
            if not path.exists():
                x, y = facing_objects(150, 16, rng)
                write_npz(path, *split(x, y, 1 / 3, rng), ["disk-dot", "disk-spike", "disk-bar", "square-dot",
                                                             "square-spike", "square-bar"])
        elif name == "lfw":
            try:
                from skimage.data import lfw_subset
            except ImportError:
                print("lfw: scikit-image is not installed (pip install scikit-image); skipped")
                continue
            if not path.exists():
                x = (lfw_subset() * 255).round().astype(np.uint8)
                y = np.array([0] * 100 + [1] * 100)  # the first 100 are faces, the rest non-faces
                write_npz(path, *split(x, y, 0.3, rng), ["face", "non-face"])
        else:
            raise SystemExit(f"unknown dataset {name!r}; allowed: facing, lfw, digits")
        sections[name] = {"source": "npz", "path": str(path), "image_size": 16}
    return sections


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="facing + digits, IPC 1, 1 seed, tiny budgets")
    p.add_argument("--datasets", default="facing,lfw,digits")
    p.add_argument("--methods", default="distribution_matching")
    p.add_argument("--dsa-modes", default="plain", help="plain, flip_one (FYI's DSA draw), or both")
    p.add_argument("--ipcs", default="1,10")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--iterations", type=int, default=60)
    p.add_argument("--epochs", default="1:80,10:25", help="student epochs per IPC")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="default runs/bench_fyi_flip[_quick]")
    args = p.parse_args()
    if args.quick:
        args.datasets, args.ipcs, args.seeds, args.iterations, args.epochs = "facing,digits", "1", 1, 20, "1:50"
    out = Path(args.out or ROOT / "runs" / ("bench_fyi_flip_quick" if args.quick else "bench_fyi_flip"))
    torch.set_num_threads(args.threads)
    epochs = {int(k): int(v) for k, v in (kv.split(":") for kv in args.epochs.split(","))}
    ipcs = [int(i) for i in args.ipcs.split(",")]
    data = build_datasets(out / "data", args.datasets.split(","))
    print(f"fyi_flip: datasets {list(data)}, methods {args.methods}, IPC {ipcs}, {args.seeds} seeds, "
          f"{args.iterations} iterations, student epochs {epochs}, threads {args.threads}")

    modes = {"plain": "single", "flip_one": "flip_then_one"}
    if set(args.dsa_modes.split(",")) - set(modes):
        raise SystemExit(f"--dsa-modes {args.dsa_modes!r}: allowed {', '.join(modes)}")
    header = ["data", "mirror keeps class", "method", "DSA draw", "IPC", "random subset", "no flip", "FYI flip",
              "Δ flip", "synth s/class (off / on)"]
    rows, records, start = [], [], time.perf_counter()
    for ds, section in data.items():
        ops = list(DSA_OPS) if MIRROR_SAFE[ds] else [op for op in DSA_OPS if op != "flip"]
        for method in args.methods.split(","):
            for mode in args.dsa_modes.split(","):
                if modes[mode] == "flip_then_one" and "flip" not in ops:
                    print(f"{ds}: DSA draw {mode} needs DSA's flip op, which {ds} leaves out; skipped")
                    continue
                for ipc in ipcs:
                    cells = {}
                    for flip in (False, True):
                        opts = ({"batch_real": 32, "dsa_ops": ops, "dsa_mode": modes[mode]}
                                | ({"inner_loop": 2} if method == "gradient_matching" else {}))
                        cfg = parse_synth_config({
                            "name": f"{ds}_{method}_{mode}_ipc{ipc}{'_flip' if flip else ''}", "seed": 0,
                            "out_dir": str(out / "artefacts"), "data": section, "ipc": ipc, "method": method,
                            "options": opts, "flip": flip, "iterations": args.iterations, "init": {"kind": "real"},
                            "eval": {"students": ["convnet3"], "seeds": args.seeds, "epochs": epochs[ipc],
                                     "batch_size": 32, "full_data": False, "dsa_ops": ops}})
                        res = synthesize(cfg, progress=False)
                        rep = eval_synth(res.root, progress=False, cache_dir=out / "eval_cache" / ds)
                        cells[flip] = (rep.cell("convnet3", "distilled"), rep.cell("convnet3", "random"),
                                       res.manifest["timing"]["seconds_per_class"])
                    (off, rnd, t_off), (on, _, t_on) = cells[False], cells[True]
                    delta = on.mean - off.mean
                    rows.append([ds, "yes" if MIRROR_SAFE[ds] else "no", method, mode, ipc,
                                 f"{rnd.mean:.2f} ± {rnd.std:.2f}", f"{off.mean:.2f} ± {off.std:.2f}",
                                 f"{on.mean:.2f} ± {on.std:.2f}", f"{delta:+.2f}", f"{t_off:.2f} / {t_on:.2f}"])
                    records.append({"data": ds, "mirror_safe": MIRROR_SAFE[ds], "method": method, "dsa_mode": mode,
                                    "ipc": ipc, "random": rnd.final, "no_flip": off.final, "flip": on.final,
                                    "delta": delta,
                                    "spread": statistics.pstdev(on.final + off.final) if len(on.final) > 1 else 0.0})
                    print(text_table(header, [rows[-1]]).splitlines()[-1], flush=True)

    print("\n" + text_table(header, rows))
    print(f"\nConvNet-3 students, final-epoch top-1 over {args.seeds} seed(s); wall {time.perf_counter() - start:.0f}s")
    print("goal: flip > no flip where the mirror keeps the class; digits is the expected failing case")
    for r in records:
        verdict = "flip > no flip" if r["delta"] > 0 else "flip <= no flip"
        print(f"  {r['data']} {r['method']} DSA {r['dsa_mode']} IPC{r['ipc']}: {verdict} ({r['delta']:+.2f})")
    report = write_benchmark_report(out, "fyi_flip", header, rows, {"args": vars(args), "records": records},
                                    "FYI flip-aware synthesis: on vs off (ConvNet-3)", sys.argv)
    print(f"report: {report}")


if __name__ == "__main__":
    main()
