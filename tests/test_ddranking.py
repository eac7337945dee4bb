"""DD-Ranking's HLR / IOR / LRS (synth.ddranking) and their place in eval-synth's report."""
from __future__ import annotations

import json
import math

import pytest
import torch

from distill.models import create_model, save_model
from distill.recipe import parse_synth_config
from synth.config import EvalConfig
from synth.ddranking import dd_ranking, hard_label_recovery, improvement_over_random, label_robust_score
from synth.eval_synth import EvalReport, SetResult, eval_synth
from synth.run import synthesize

OPS = ["color", "crop", "cutout", "scale", "rotate"]  # digits: no flip in DSA


def package_lrs(full: float, syn_hard: float, syn_any: float, rdm_any: float, lrs_lambda: float = 0.5) -> float:
    """ddranking 0.2.0 metrics/soft_label.py:561-564 (hard_label.py:380-383 alike), as written there,
    on accuracies as fractions (the documented normalisation to [0, 1])."""
    hlr = 1.00 * (full - syn_hard)
    ior = 1.00 * (syn_any - rdm_any)
    alpha = lrs_lambda * ior - (1 - lrs_lambda) * hlr
    return (math.exp(alpha) - math.exp(-1)) / (math.exp(1) - math.exp(-1))


# (real-hard, syn-hard, syn-any, rdm-any in percent, w) -> (HLR, IOR, LRS); LRS computed with package_lrs
GOLDEN = [
    ((90.0, 50.0, 70.0, 60.0, 0.5), (40.0, 10.0, 20.967836738047)),
    ((97.87, 91.74, 86.94, 92.31, 0.5), (6.13, -5.37, 24.516757314903)),
    ((50.0, 50.0, 50.0, 50.0, 0.5), (0.0, 0.0, 26.894142137000)),   # alpha 0
    ((0.0, 100.0, 100.0, 0.0, 0.5), (-100.0, 100.0, 100.0)),         # alpha 1: the top of the range
    ((100.0, 0.0, 0.0, 100.0, 0.5), (100.0, -100.0, 0.0)),           # alpha -1: the bottom
    ((90.0, 50.0, 70.0, 60.0, 0.8), (40.0, 10.0, 26.894142137000)),
    ((90.0, 50.0, 70.0, 60.0, 0.0), (40.0, 10.0, 12.867609669731)),  # HLR only
    ((90.0, 50.0, 70.0, 60.0, 1.0), (40.0, 10.0, 31.368734174707)),  # IOR only
]


@pytest.mark.parametrize("acc, expected", GOLDEN)
def test_formulas_match_golden_values(acc, expected):
    real, syn_hard, syn_any, rdm, w = acc
    hlr, ior = hard_label_recovery(real, syn_hard), improvement_over_random(syn_any, rdm)
    assert (hlr, ior) == pytest.approx(expected[:2], abs=1e-9)
    assert label_robust_score(hlr, ior, w) == pytest.approx(expected[2], abs=1e-9)
    assert label_robust_score(hlr, ior, w) == pytest.approx(100 * package_lrs(*(a / 100 for a in acc[:4]), w), abs=1e-9)
    m = dd_ranking(real, syn_hard, syn_any, rdm, weight=w)
    assert (m.hlr, m.ior, m.lrs) == pytest.approx(expected, abs=1e-9) and m.missing == {}


def test_missing_inputs_say_why_and_weight_is_checked():
    m = dd_ranking(None, None, 80.0, 70.0, why={"real_hard": "full_data is off", "syn_hard": "full_data is off"})
    assert m.hlr is None and m.lrs is None and m.ior == pytest.approx(10.0)
    assert m.missing == {"hlr": "full_data is off", "lrs": "full_data is off"}  # one reason, said once
    m = dd_ranking(90.0, 80.0, 80.0, None)
    assert m.ior is None and m.missing["ior"] == m.missing["lrs"] == "no rdm-any run"
    js = m.to_json()
    assert js["hlr"] == pytest.approx(10.0) and js["not_available"] == m.missing and "ddranking 0.2.0" in js["source"]
    with pytest.raises(ValueError, match="weight"):
        label_robust_score(1.0, 1.0, 1.5)


def _cell(name, mode, finals):
    return SetResult(name, "convnet3", mode, 20, 100, 160, list(finals))


def test_report_picks_the_runs_each_metric_needs(tmp_path):
    p = EvalConfig(seeds=2)
    hard = EvalReport(tmp_path, p, 2, [_cell("distilled", "hard", [60, 62]), _cell("random", "hard", [50, 54]),
                                       _cell("full", "hard", [90, 92])])
    m = hard.ddranking("convnet3")  # hard labels: the distilled set is its own syn-hard
    assert hard.ddranking_sets("convnet3")["syn_hard"] == "distilled"
    assert (m.hlr, m.ior) == pytest.approx((91 - 61, 61 - 52)) and m.lrs == pytest.approx(label_robust_score(30, 9))

    soft = EvalReport(tmp_path, p, 2, [_cell("distilled", "relabel", [70, 70]),
                                       _cell("distilled_hard", "hard", [58, 60]),
                                       _cell("random", "relabel", [66, 68]), _cell("full", "hard", [90, 92])])
    m = soft.ddranking("convnet3")
    assert soft.ddranking_sets("convnet3") == {"real_hard": "full", "syn_hard": "distilled_hard",
                                               "syn_any": "distilled", "rdm_any": "random"}
    assert (m.hlr, m.ior) == pytest.approx((91 - 59, 70 - 67))

    off = EvalReport(tmp_path, EvalConfig(seeds=2, full_data=False, random_subset=False),
                     2, [_cell("distilled", "relabel", [70, 70])])
    m = off.ddranking("convnet3")
    assert m.hlr is m.ior is m.lrs is None
    assert "full_data is off" in m.missing["hlr"] and "random_subset is off" in m.missing["ior"]
    assert any("HLR not available: full_data is off" in n for n in off.ddranking_notes()) and "n/a" in off.text()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """An untrained BatchNorm ResNet checkpoint: enough to relabel."""
    path = tmp_path_factory.mktemp("teacher") / "resnet.safetensors"
    torch.manual_seed(0)
    save_model(path, create_model("test_resnet", 10, 1, 8, tuple(str(i) for i in range(10))))
    return path


def test_eval_synth_reports_ddranking_with_a_distilled_hard_run(tmp_path, teacher):
    raw = {"name": "ddr", "out_dir": str(tmp_path / "synth"), "seed": 0,
           "data": {"source": "digits", "image_size": 8, "train_limit": 200},
           "ipc": 2, "method": "distribution_matching", "options": {"batch_real": 8, "dsa_ops": OPS}, "iterations": 2,
           "teachers": [{"model": "test_resnet", "checkpoint": str(teacher)}],
           "labels": {"mode": "relabel", "relabel": {"epochs": 2, "crops_per_image": 1, "topk": 3}},
           "eval": {"epochs": 2, "seeds": 2, "full_epochs": 1, "batch_size": 64, "dsa_ops": OPS}}
    res = synthesize(parse_synth_config(raw), progress=False)
    report = eval_synth(res.root, progress=False, cache_dir=tmp_path / "cache")

    cells = {r.set_name: r for r in report.results}
    assert set(cells) == {"distilled", "distilled_hard", "random", "full"}
    assert cells["distilled"].label_mode == "relabel" and cells["distilled_hard"].label_mode == "hard"
    assert len(cells["distilled_hard"].final) == 2 and cells["distilled_hard"].label_bytes == 8 * 20
    hlr = cells["full"].mean - cells["distilled_hard"].mean
    ior = cells["distilled"].mean - cells["random"].mean
    lrs = label_robust_score(hlr, ior)

    saved = json.loads((res.root / "eval" / "results.json").read_text())["ddranking"]["convnet3"]
    assert (saved["hlr"], saved["ior"], saved["lrs"]) == pytest.approx((hlr, ior, lrs))
    assert saved["sets"]["syn_hard"] == "distilled_hard" and saved["not_available"] == {}
    assert saved["inputs"]["syn_hard"] == pytest.approx(cells["distilled_hard"].mean)
    md = (res.root / "eval" / "report.md").read_text()
    assert "## DD-Ranking" in md and f"| convnet3 | {hlr:.2f} | {ior:+.2f} | {lrs:.2f} | distilled_hard |" in md
    assert "DD-Ranking" in report.text() and "arXiv:2505.13300" in md

    # the distilled_hard runs have deterministic directories: switching the random subset off reuses them
    again = eval_synth(res.root, progress=False, cache_dir=tmp_path / "cache", overrides=["random_subset=false"])
    assert again.cell("convnet3", "distilled_hard").final == cells["distilled_hard"].final
    m = again.ddranking("convnet3")
    assert m.hlr == pytest.approx(hlr) and m.ior is None and m.lrs is None
    md = (res.root / "eval" / "report.md").read_text()
    assert "IOR not available: random_subset is off" in md and "| n/a |" in md
    saved = json.loads((res.root / "eval" / "results.json").read_text())["ddranking"]["convnet3"]
    assert saved["ior"] is None and "random_subset is off" in saved["not_available"]["lrs"]
