"""The labeler registry: `labels:` as a tagged union, legacy sections, and a new source end to end."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml

from distill.config import dump_config
from distill.errors import ConfigError
from distill.recipe import parse_config
from distill.runner import train
from students.losses import KD_LOSSES
from teachers.labeling import LABELERS, LabelContext, labeling_for
from teachers.smoothing import SmoothedLabeler


def test_every_label_source_is_registered_with_options():
    assert {"hard", "pool", "store", "active", "label_smoothing", "relabel", "projector"} <= set(LABELERS.names())
    for name in LABELERS.names():
        cls = LABELERS.get(name)
        assert cls.registered_name == name and hasattr(cls.Options, "model_fields")


def test_default_source_follows_the_pool(tiny_recipe):
    assert labeling_for(parse_config(tiny_recipe())).name == "hard"
    with_pool = tiny_recipe(pool={"teachers": [{"model": "test_vit"}]})
    assert labeling_for(parse_config(with_pool)).name == "pool"


def test_legacy_and_tagged_sections_are_the_same_recipe(tiny_recipe, tmp_path):
    pool = {"teachers": [{"model": "test_vit"}]}
    legacy = parse_config(tiny_recipe(pool=pool, labels={"active": {"budget": 0.5, "labelled": 8}}))
    tagged = parse_config(tiny_recipe(pool=pool, labels={"source": "active", "budget": 0.5, "labelled": 8}))
    assert legacy.hash() == tagged.hash() and labeling_for(legacy).options.budget == 0.5
    store = parse_config(tiny_recipe(labels={"store": str(tmp_path / "s"), "decode": "hard"}))
    assert labeling_for(store).name == "store" and labeling_for(store).options.decode == "hard"
    # the resolved config written to a run directory reads back as the same recipe
    assert parse_config(yaml.safe_load(dump_config(store))).hash() == store.hash()


def test_label_source_errors_name_the_field(tiny_recipe):
    with pytest.raises(ConfigError, match=r"labels.source: not allowed; unknown label source 'teacher'.*'store'"):
        parse_config(tiny_recipe(labels={"source": "teacher"}))
    with pytest.raises(ConfigError, match=r"labels.epsilon"):
        parse_config(tiny_recipe(labels={"source": "label_smoothing", "epsilon": 1.5}))
    with pytest.raises(ConfigError, match="exactly one of labels.store"):
        parse_config(tiny_recipe(labels={"decode": "hard"}))
    with pytest.raises(ConfigError, match="set pool.teachers"):
        parse_config(tiny_recipe(labels={"source": "pool"}))


def test_label_smoothing_source_serves_smoothed_one_hot():
    labeler = SmoothedLabeler(lambda x, g: x, num_classes=4, epsilon=0.2)
    targets = torch.tensor([0, 3])
    batch = labeler(torch.rand(2, 1, 8, 8), targets, torch.arange(2), 0, torch.Generator())
    assert torch.allclose(batch.soft.probs, torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.05, 0.85]]))
    logits = torch.randn(2, 4)
    expected = F.cross_entropy(logits, targets, label_smoothing=0.2)
    assert torch.allclose(KD_LOSSES.get("soft_ce")(logits, batch.soft.probs, 1.0), expected, atol=1e-6)
    assert labeler.cost.total_queries == 0


def test_label_smoothing_recipe_trains_end_to_end(tiny_recipe):
    res = train(parse_config(tiny_recipe("smooth", labels={"source": "label_smoothing", "epsilon": 0.1})))
    assert res.history[-1]["train_kd"] > 0 and res.final["teacher_queries"] == 0
    report = (res.run_dir / "report.md").read_text()
    assert "hard labels smoothed (ε = 0.1)" in report
    cfg = yaml.safe_load((res.run_dir / "config.yaml").read_text())
    assert cfg["labels"] == {"source": "label_smoothing", "epsilon": 0.1}


def test_build_needs_only_the_context(tiny_recipe):
    from distill.data import load_data

    cfg = parse_config(tiny_recipe(labels={"source": "label_smoothing"}))
    train_set, _ = load_data(cfg.data)
    labeler = labeling_for(cfg).build(LabelContext(train_set, torch.device("cpu"), lambda x, g: x, None, cfg))
    assert labeler.num_classes == train_set.num_classes
