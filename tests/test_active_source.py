import pytest
import torch

from distill.artefacts import load_state
from distill.errors import ConfigError
from distill.recipe import parse_config
from distill.runner import train
from teachers.query_budget import ActiveQuerySource
from teachers.selection import BudgetExceeded, RobustActiveDistillation
from teachers.source import QueryCost, SoftLabels


class SpySource:
    """`teachers` fake teachers; records every index (and targets) it is asked about."""

    def __init__(self, teachers: int = 2, num_classes: int = 3, per_image: int = 1):
        self.teachers, self.num_classes, self.per_image = teachers, num_classes, per_image
        self.cost = QueryCost()
        self.seen: list[int] = []
        self.targets_seen: list = []

    def soft_labels(self, images, targets=None, index=None):
        self.seen += index.tolist()
        self.targets_seen.append(targets)
        for j in range(self.teachers):
            self.cost.add(f"t{j}", len(images) * self.per_image, 0.001)
        probs = torch.softmax(images.flatten(1)[:, :self.num_classes] * 10, 1)
        return SoftLabels(probs=probs)


def _images(n: int) -> torch.Tensor:
    return torch.rand(n, 1, 4, 4, generator=torch.Generator().manual_seed(n))


def test_budget_accounting_is_exact_and_refusal_costs_nothing():
    spy = SpySource(teachers=2)
    src = ActiveQuerySource(spy, budget_images=10, teachers=2)
    src.query(_images(4), torch.tensor([7, 3, 9, 1]), "round 1")
    assert src.ledger.spent == 8 == spy.cost.total_queries and spy.cost.queries == {"t0": 4, "t1": 4}
    src.query(_images(6), torch.arange(20, 26), "round 2", batch_size=4)  # batching changes nothing
    assert src.ledger.spent == 20 == src.ledger.total == spy.cost.total_queries
    assert [s["queries"] for s in src.spends] == [8, 12] and src.ledger.rounds == [8, 12]
    seen = list(spy.seen)
    with pytest.raises(BudgetExceeded, match="only 0 of 20 remain"):
        src.query(_images(1), torch.tensor([50]), "round 3")
    assert spy.seen == seen and src.ledger.spent == 20  # no teacher ran, nothing booked
    with pytest.raises(ValueError, match="already queried"):
        src.query(_images(1), torch.tensor([7]), "again")
    assert sorted(spy.seen) == [1, 3, 7, 9, 20, 21, 22, 23, 24, 25]


def test_source_counting_more_than_asked_is_refused():
    src = ActiveQuerySource(SpySource(teachers=1, per_image=3), budget_images=10, teachers=1)
    with pytest.raises(RuntimeError, match="should cost 2 queries, the label source counted 6"):
        src.query(_images(2), torch.tensor([0, 1]), "round 1")


def test_cached_labels_are_served_without_a_teacher_call():
    spy = SpySource()
    src = ActiveQuerySource(spy, budget_images=5, teachers=2)
    probs = src.query(_images(3), torch.tensor([4, 8, 2]), "round 1", targets=None)
    calls = len(spy.seen)
    soft = src.soft_labels(torch.rand(4, 1, 4, 4), index=torch.tensor([8, 5, 4, 2]))
    assert len(spy.seen) == calls  # served from the cache
    assert soft.mask.tolist() == [True, False, True, True]
    assert torch.equal(soft.probs[[0, 2, 3]], probs[[1, 0, 2]]) and soft.probs[1].abs().sum() == 0
    with pytest.raises(ValueError, match="index"):
        src.soft_labels(torch.rand(1, 1, 4, 4))


def test_state_round_trip_restores_cache_ledger_and_counters():
    spy = SpySource()
    src = ActiveQuerySource(spy, budget_images=6, teachers=2)
    src.charge("setup", 0)
    src.query(_images(2), torch.tensor([5, 6]), "round 1")
    state = src.state_dict()
    other = ActiveQuerySource(SpySource(), budget_images=6, teachers=2)
    other.load_state_dict(state)
    assert other.ledger.rounds == src.ledger.rounds and other.cost.queries == {"t0": 2, "t1": 2}
    assert torch.equal(other.lookup(torch.tensor([6, 5]))[0], src.lookup(torch.tensor([6, 5]))[0])


def test_rad_selection_matches_the_hand_computed_case():
    # margins 0.1 / 0.4 / 0.7 → gains g = (0.9, 0.6, 0.3); k = round(1/3 × 3) = 1 → p = (0.4, 0.6, 0)
    student = torch.tensor([[0.55, 0.45], [0.70, 0.30], [0.85, 0.15]])
    rad = RobustActiveDistillation()
    gen = torch.Generator().manual_seed(0)
    picks = torch.stack([rad.select(student, 1, gen, teacher_error=1 / 3) for _ in range(4000)]).flatten()
    freq = torch.bincount(picks, minlength=3).float() / len(picks)
    assert freq[2] == 0 and abs(freq[0] - 0.4) < 0.03 and abs(freq[1] - 0.6) < 0.03
    assert sorted(rad.select(student, 2, gen, teacher_error=1 / 3).tolist()) == [0, 1]  # the support, never point 2
    # only the selected pool images reach the teacher
    spy = SpySource(teachers=1, num_classes=2)
    pool_index = torch.tensor([40, 41, 42])
    sel = pool_index[rad.select(student, 2, gen, teacher_error=1 / 3)]
    ActiveQuerySource(spy, 2, 1).query(_images(2), sel, "round 1")
    assert sorted(spy.seen) == [40, 41] and spy.targets_seen == [None]


# ---------------------------------------------------------------- the job, end to end


def _active_recipe(tiny_recipe, name, **active):
    return tiny_recipe(name, student={"model": "test_vit"}, trainer={"epochs": 1, "batch_size": 16},
                       pool={"teachers": [{"model": "test_vit", "name": "a"}, {"model": "test_resnet", "name": "b"}]},
                       labels={"active": {"budget": 0.25, "rounds": 2, "strategy": "rad", "labelled": 16, **active}})


def _key(image01: torch.Tensor) -> bytes:
    return (image01 * 255).round().to(torch.uint8).numpy().tobytes()


def test_active_job_sends_only_selected_images_and_reports_the_budget(tiny_recipe, monkeypatch):
    from distill.data import load_data
    from teachers.teacher import Teacher

    seen: dict[str, list[bytes]] = {"a": [], "b": []}
    original = Teacher.logits

    def spy(self, images):
        seen[self.name] += [_key(x) for x in images]
        return original(self, images)

    monkeypatch.setattr(Teacher, "logits", spy)
    cfg = parse_config(_active_recipe(tiny_recipe, "act"))
    res = train(cfg)
    a = res.final["active"]
    # 80 pool images × 25 % = 20 images per teacher: 16 to measure the teacher error on L, 2 + 2 in rounds
    assert a["budget_queries"] == 40 and a["spent_queries"] == 40 and a["pool"] == 80
    assert [(r["name"], r["images"], r["queries"]) for r in a["rounds"]] == [
        ("calibration: teacher error on the labelled set", 16, 32), ("round 0: labelled set only", 0, 0),
        ("round 1", 2, 4), ("round 2", 2, 4)]
    assert res.final["teacher_queries_by_teacher"] == {"a": 20, "b": 20}
    assert len(seen["a"]) == len(seen["b"]) == 20

    state, _ = load_state(res.run_dir / "active" / "state.safetensors")
    selected = torch.cat([state["selections"]["1"], state["selections"]["2"]])
    train_set, _ = load_data(cfg.data)
    order = torch.randperm(96, generator=torch.Generator().manual_seed(cfg.seed))
    labelled, pool = order[:16], order[16:]
    allowed = {_key(train_set[int(i)][0].float() / 255) for i in torch.cat([labelled, selected])}
    never = {_key(train_set[int(i)][0].float() / 255) for i in pool if i not in selected} - allowed
    assert len(never) > 70 and set(seen["a"]) <= allowed and not (set(seen["a"]) | set(seen["b"])) & never
    report = (res.run_dir / "report.md").read_text()
    assert "Teacher-query budget" in report and "spent **40**" in report
    assert [r["round"] for r in res.history][-1] == 2 and (res.run_dir / "student.safetensors").exists()


def test_active_job_resumes_without_requerying(tiny_recipe, monkeypatch):
    from students.trainer import Trainer

    full = train(parse_config(_active_recipe(tiny_recipe, "full", teacher_error=0.2)))
    calls = {"n": 0}
    original = Trainer.save_checkpoint

    def crash(self, epochs_done):
        original(self, epochs_done)
        calls["n"] += 1
        if calls["n"] == 2:  # after round 1's training
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(Trainer, "save_checkpoint", crash)
    raw = _active_recipe(tiny_recipe, "killed", teacher_error=0.2)
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(raw))
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    resumed = train(parse_config(raw))
    assert resumed.final["active"]["spent_queries"] == full.final["active"]["spent_queries"] == 40
    assert resumed.final["teacher_queries_by_teacher"] == {"a": 20, "b": 20}
    assert resumed.final["test_top1"] == full.final["test_top1"]
    a, b = (load_state(r.run_dir / "active" / "state.safetensors")[0] for r in (full, resumed))
    assert all(torch.equal(a["selections"][k], b["selections"][k]) for k in ("1", "2"))


@pytest.mark.parametrize("change, message", [
    ({"budget": 0.05}, r"labels.active.budget: 0.05 × 80 pool images allows 4 images"),
    ({"strategy": "coreset"}, r"unknown strategy 'coreset'; allowed: .*rad"),
    ({"options": {"bogus": 1}}, r"do not fit strategy 'rad'"),
    ({"labelled": 0}, r"rad needs the teacher's error rate"),
])
def test_bad_active_recipes_are_refused_before_compute(tiny_recipe, change, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        train(parse_config(_active_recipe(tiny_recipe, "bad", **change)))
    assert not (tmp_path / "runs" / "bad" / "metrics.jsonl").exists()


def test_active_needs_a_pool_and_no_hard_label_term(tiny_recipe):
    raw = _active_recipe(tiny_recipe, "x")
    with pytest.raises(ConfigError, match="set pool.teachers"):
        parse_config({k: v for k, v in raw.items() if k != "pool"})
    with pytest.raises(ConfigError, match="loss.hard_ce: 0"):
        parse_config({**raw, "loss": {"hard_ce": 0.5}})
    with pytest.raises(ConfigError, match="must be <= labels.active.labelled"):
        parse_config({**raw, "pool": {**raw["pool"], "weighting": "distill_weighted", "labelled": 32}})
