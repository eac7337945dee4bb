"""DD-Ranking's label-robust metrics, computed from eval-synth's accuracies.

DD-Ranking ("DD-Ranking: Rethinking the Evaluation of Dataset Distillation", Li et al. 2025,
arXiv:2505.13300; PyPI `ddranking` 0.2.0) scores a distilled set by what its images recover beyond
the labels and augmentation used to evaluate them. From four accuracies (top-1, percent):

- real-hard: the full training set, hard labels;
- syn-hard:  the distilled images, hard labels;
- syn-any:   the distilled images with their own evaluation (hard or soft labels);
- rdm-any:   a random real subset at the same IPC, evaluated the same way as syn-any;

    HLR   = real-hard − syn-hard                       hard-label recovery, lower is better
    IOR   = syn-any − rdm-any                          improvement over random, higher is better
    alpha = w · IOR − (1 − w) · HLR                    w = 0.5 by default
    LRS   = 100 · (e^alpha − e^−1) / (e − e^−1)        label-robust score, in [0, 100]

`ddranking/metrics/soft_label.py` lines 561-564 (`LabelRobustScoreSoft.compute_metrics`, line 495,
`lrs_lambda=0.5`) and `ddranking/metrics/hard_label.py` lines 380-383 (`LabelRobustScoreHard.compute_metrics`,
line 325, where syn-any is syn-hard). HLR and IOR are in percentage points, as there (accuracies are
percent: `ddranking/utils/meter.py` line 168). alpha is taken on accuracies as fractions, so that
alpha lies in [−1, 1] and LRS in [0, 100] as the paper and the project's documentation
(`doc/introduction.md`: "LRS = 100% × (e^α − e^−1)/(e − e^−1)", "normalized to [0, 1]") define it;
the package's code feeds percentage points to `np.exp` unscaled, which leaves that range.

The package itself is not used: its metric code is inline in evaluator classes that load their own
datasets and teacher checkpoints and train their own students (with a learning-rate search and
best-epoch accuracy), so it cannot score accuracies trained elsewhere.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

LRS_WEIGHT = 0.5  # ddranking's `lrs_lambda` default (and its leaderboard's w)
SOURCE = ("DD-Ranking (arXiv:2505.13300), ddranking 0.2.0 metrics/soft_label.py:561-564, "
          "metrics/hard_label.py:380-383; alpha on fractions (LRS in [0, 100])")
INPUTS = ("real_hard", "syn_hard", "syn_any", "rdm_any")


def hard_label_recovery(real_hard: float, syn_hard: float) -> float:
    """HLR, points: what hard-label training on the distilled images still lacks against the full data."""
    return real_hard - syn_hard


def improvement_over_random(syn_any: float, rdm_any: float) -> float:
    """IOR, points: the distilled set over a random real subset under the same labels and augmentation."""
    return syn_any - rdm_any


def label_robust_score(hlr: float, ior: float, weight: float = LRS_WEIGHT) -> float:
    """LRS in [0, 100] from HLR and IOR in points (alpha on fractions)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"LRS weight must be in [0, 1], got {weight}")
    alpha = weight * ior / 100 - (1 - weight) * hlr / 100
    return 100 * (math.exp(alpha) - math.exp(-1)) / (math.e - math.exp(-1))


@dataclass(frozen=True)
class DDRanking:
    """HLR, IOR and LRS of one student, None where an input run is missing (`missing` says why)."""

    inputs: dict[str, float | None]  # real_hard, syn_hard, syn_any, rdm_any (mean top-1, percent)
    hlr: float | None
    ior: float | None
    lrs: float | None
    weight: float = LRS_WEIGHT
    missing: dict[str, str] = field(default_factory=dict)  # metric -> why it is not available

    def to_json(self) -> dict[str, Any]:
        return {"hlr": self.hlr, "ior": self.ior, "lrs": self.lrs, "lrs_weight": self.weight,
                "inputs": self.inputs, "not_available": self.missing, "source": SOURCE}


def dd_ranking(real_hard: float | None, syn_hard: float | None, syn_any: float | None, rdm_any: float | None,
               why: Mapping[str, str] | None = None, weight: float = LRS_WEIGHT) -> DDRanking:
    """The three metrics from the four accuracies; `why` says, per input left None, why it was not run."""
    inputs = dict(zip(INPUTS, (real_hard, syn_hard, syn_any, rdm_any)))
    why = dict(why or {})

    def reason(*names: str) -> str:
        return "; ".join(dict.fromkeys(why.get(n, f"no {n.replace('_', '-')} run") for n in names
                                       if inputs[n] is None))

    hlr = None if real_hard is None or syn_hard is None else hard_label_recovery(real_hard, syn_hard)
    ior = None if syn_any is None or rdm_any is None else improvement_over_random(syn_any, rdm_any)
    lrs = None if hlr is None or ior is None else label_robust_score(hlr, ior, weight)
    missing = {}
    if hlr is None:
        missing["hlr"] = reason("real_hard", "syn_hard")
    if ior is None:
        missing["ior"] = reason("syn_any", "rdm_any")
    if lrs is None:
        missing["lrs"] = reason(*INPUTS)
    return DDRanking(inputs, hlr, ior, lrs, weight, missing)
