import pytest
import torch
from torch import nn

from distill.errors import ConfigError
from distill.models import ImageClassifier, create_model, save_model
from distill.recipe import parse_config
from distill.runner import train
from teachers import EnsemblePool, Teacher
from teachers.pool import target_subset, teacher_features

C = 10
NAMES = tuple(str(i) for i in range(C))


class BrightnessNet(nn.Module):
    """A timm-shaped toy: the class is the image's brightness decile. `perfect` features are that
    class one-hot; `random` features ignore the image. Its own head has `out` classes."""

    def __init__(self, mode: str, out: int = C, seed: int = 0):
        super().__init__()
        self.mode, self.gen = mode, torch.Generator().manual_seed(seed)
        self.fc = nn.Linear(C, out)
        with torch.no_grad():
            self.fc.weight.copy_(torch.eye(out, C) * 8)
            self.fc.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "random":
            return torch.randn(len(x), C, generator=self.gen)
        level = ((x.mean(dim=(1, 2, 3)) + 1) / 2 * C).floor().clamp(0, C - 1).long()  # undo mean/std 0.5
        return nn.functional.one_hot(level, C).float()

    def forward_head(self, f: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return f if pre_logits else self.fc(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _teacher(name: str, mode: str, out: int = C) -> Teacher:
    names = NAMES if out == C else tuple(f"other{i}" for i in range(out))
    return Teacher(name, ImageClassifier(BrightnessNet(mode, out), "toy", out, 1, 4, (0.5,), (0.5,), names))


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images, class c = a flat image of brightness (c + 0.5) / C, classes in a seeded order."""
    y = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % C
    x = ((y.float() + 0.5) / C).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return x, y


@pytest.mark.parametrize("weighting", ["uniform", "fixed", "distill_weighted", "confidence"])
def test_weights_sum_to_one(weighting):
    x, y = _data(40)
    pool = EnsemblePool([_teacher("good", "perfect"), _teacher("noise", "random")],
                        weights=[3, 1] if weighting == "fixed" else None, weighting=weighting)
    if pool.needs_fit:
        pool.fit(x, y)
    soft = pool.soft_labels(x)
    assert torch.allclose(soft.probs.sum(1), torch.ones(len(x)), atol=1e-5)
    assert abs(sum(pool.report()["weights"].values()) - 1) < 1e-6
    assert abs(float(pool.weights.sum()) - 1) < 1e-6


def test_distill_weighted_ranks_a_perfect_teacher_above_a_random_one():
    x, y = _data(60)
    pool = EnsemblePool([_teacher("noise", "random"), _teacher("good", "perfect")], weighting="distill_weighted",
                        weight_temperature=0.1)
    with pytest.raises(RuntimeError, match="needs fit"):
        pool.soft_labels(x)
    pool.fit(x, y, batch_size=16)
    rep = pool.report()
    assert rep["scores"]["good"] == 1.0 and rep["scores"]["noise"] < 0.5
    assert rep["weights"]["good"] > 0.98 and rep["weights"]["noise"] < 0.02
    assert pool.cost.queries == {"noise": 60, "good": 60}  # fitting is counted: each teacher saw each image once
    # τ → large: uniform; the same scores, a softer softmax
    soft = EnsemblePool(pool.teachers, weighting="distill_weighted", weight_temperature=100.0).fit(x, y)
    assert abs(soft.report()["weights"]["good"] - 0.5) < 0.01


def test_confidence_weights_favour_the_teacher_right_on_each_sample():
    x, y = _data(20)
    pool = EnsemblePool([_teacher("good", "perfect"), _teacher("noise", "random")], weighting="confidence",
                        confidence_targets=True)
    assert set(pool.report()["weights"].values()) == {None}  # nothing served yet: nothing to report
    pool.soft_labels(x, y)
    w = pool.report()["weights"]
    assert w["good"] > w["noise"] and abs(w["good"] + w["noise"] - 1) < 1e-6


def test_foreign_teacher_votes_through_a_fitted_target_head():
    x, y = _data(50)
    parity = _teacher("parity", "perfect", out=2)  # another task: 2 classes
    pool = EnsemblePool([parity], num_classes=C, class_names=NAMES)
    assert pool.foreign == ["parity"] and pool.needs_fit
    pool.fit(x, y)
    xt, yt = _data(30, seed=1)
    soft = pool.soft_labels(xt)
    assert soft.probs.shape == (30, C) and (soft.probs.argmax(1) == yt).all()
    assert pool.report()["heads"] == ["parity"]
    with pytest.raises(ValueError, match="disagree on the class count"):
        EnsemblePool([parity, _teacher("good", "perfect")])


def test_teacher_features_of_timm_and_engine_models():
    x = torch.rand(3, 1, 16, 16)
    for arch in ("test_resnet", "convnet3"):
        t = Teacher(arch, create_model(arch, C, 1, 16, NAMES))
        f = teacher_features(t, x)
        assert f.dim() == 2 and len(f) == 3


def test_target_subset_is_seeded_and_nested():
    a, b = target_subset(100, 10, 3), target_subset(100, 30, 3)
    assert torch.equal(a, b[:10]) and len(set(b.tolist())) == 30
    with pytest.raises(ValueError):
        target_subset(5, 6, 0)


def test_recipe_with_weighted_pool_and_foreign_teacher_reports_weights(tiny_recipe, tmp_path):
    torch.manual_seed(0)
    other = tmp_path / "three_class.safetensors"
    save_model(other, create_model("test_resnet", 3, 1, 16, ("a", "b", "c")))
    raw = tiny_recipe("w", trainer={"epochs": 1},
                      pool={"teachers": [{"model": "test_vit", "name": "same"},
                                         {"model": "test_resnet", "name": "other", "checkpoint": str(other)}],
                            "weighting": "distill_weighted", "labelled": 40, "temperature": 0.05})
    res = train(parse_config(raw))
    pool = res.final["pool"]
    assert pool["heads"] == ["other"] and abs(sum(pool["weights"].values()) - 1) < 1e-6
    assert res.final["teacher_queries_by_teacher"] == {"same": 40 + 96, "other": 40 + 96}
    report = (res.run_dir / "report.md").read_text()
    assert "Teacher weights" in report and "distill_weighted" in report


def test_bad_pool_weighting_recipes_are_refused(tiny_recipe, tmp_path):
    def err(pool):
        with pytest.raises(ConfigError) as e:
            parse_config(tiny_recipe(pool={"teachers": [{"model": "test_vit"}], **pool}))
        return str(e.value)

    assert "pool.labelled >= 2" in err({"weighting": "distill_weighted"})
    assert "weighting is 'fixed'" in err({"weighting": "fixed"})
    assert "weighting is 'fixed'" in err({"weights": [1.0], "weighting": "uniform"})
    assert "not allowed" in err({"weighting": "best"})
    assert parse_config(tiny_recipe(pool={"teachers": [{"model": "test_vit"}], "weights": [1.0]})).pool.weighting == "fixed"
    # a teacher for another class count without a labelled subset is refused before compute
    other = tmp_path / "t3.safetensors"
    save_model(other, create_model("test_vit", 3, 1, 16, ("a", "b", "c")))
    with pytest.raises(ConfigError, match="set pool.labelled to fit a target head"):
        train(parse_config(tiny_recipe("x", pool={"teachers": [{"model": "test_vit", "checkpoint": str(other)}]})))
