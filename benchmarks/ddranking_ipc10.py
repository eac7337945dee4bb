"""DD-Ranking's HLR / IOR / LRS for the recorded synth benchmark (IPC 10 by default); trains nothing.

    .venv/bin/python benchmarks/ddranking_ipc10.py
    .venv/bin/python benchmarks/ddranking_ipc10.py --ipc 1 --markdown

Reads `benchmarks/results/synth_ipc.json` (written by `benchmarks/synth_ipc.py`) and applies
`synth.ddranking` (definitions and their source: docs/synth.md, "DD-Ranking") to the recorded
final-epoch means of each row:

- syn-any:   the row's distilled set, with the row's labels (`top1`);
- rdm-any:   the random real subset at the same IPC with the same labels (`random_top1`);
- real-hard: the full data with hard labels (the `full` record of the data set and IPC);
- syn-hard:  the distilled images with hard labels. A `hard` row is its own; a `relabel` row takes
  the `hard` row of the same data, IPC, method and flip, which trained on the same pixels (synth_ipc
  synthesises once and the relabel artefact reuses the hard artefact's chunks, `make_artefact`),
  under the same protocol: the run eval-synth now makes as `distilled_hard`.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from distill.report import markdown_table, text_table  # noqa: E402
from synth.ddranking import LRS_WEIGHT, dd_ranking  # noqa: E402

HEADER = ["data", "IPC", "method", "FYI flip", "labels", "syn-any", "rdm-any", "syn-hard", "real-hard",
          "HLR ↓", "IOR ↑", f"LRS (w={LRS_WEIGHT}) ↑"]


def ddranking_rows(records: list[dict], ipc: int) -> list[list[str]]:
    """One row per recorded distilled set at `ipc`; n/a (with the missing run named) where a run is absent."""
    mean = statistics.fmean
    full = {r["data"]: mean(r["top1"]) for r in records if r["method"] == "full" and r["ipc"] == ipc}
    hard = {(r["data"], r["method"], r["flip"]): mean(r["top1"]) for r in records
            if r["ipc"] == ipc and r["method"] not in ("random", "full") and r["labels"] == "hard"}
    rows = []
    for r in records:
        if r["ipc"] != ipc or r["method"] in ("random", "full"):
            continue
        syn_hard = hard.get((r["data"], r["method"], r["flip"]))
        m = dd_ranking(full.get(r["data"]), syn_hard, mean(r["top1"]), mean(r["random_top1"]),
                       why={"real_hard": "no full-data record", "syn_hard": "no hard-label row for these images"})
        fmt = lambda v, sign="": "n/a" if v is None else f"{v:{sign}.2f}"  # noqa: E731
        source = "" if r["labels"] == "hard" else " (hard row)"
        rows.append([r["data"], ipc, r["method"], "on" if r["flip"] else "off", r["labels"],
                     fmt(m.inputs["syn_any"]), fmt(m.inputs["rdm_any"]), fmt(syn_hard) + source,
                     fmt(m.inputs["real_hard"]), fmt(m.hlr), fmt(m.ior, "+"), fmt(m.lrs)])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "synth_ipc.json"))
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    args = p.parse_args()
    recorded = json.loads(Path(args.results).read_text())
    rows = ddranking_rows(recorded["records"], args.ipc)
    if not rows:
        raise SystemExit(f"{args.results}: no distilled-set records at IPC {args.ipc}")
    print((markdown_table if args.markdown else text_table)(HEADER, rows))
    budget = recorded["budget"]
    print(f"\nfrom {args.results} (benchmarks/synth_ipc.py, {recorded['args']['seeds']} seeds, "
          f"student epochs {budget['epochs'][str(args.ipc)]}, full data {budget['full_epochs']} epochs): "
          "top-1 final-epoch means in percent; HLR, IOR in points; LRS in [0, 100]. "
          "syn-hard of a relabel row: the hard row of the same images.")


if __name__ == "__main__":
    main()
