"""Selection strategies and the query ledger: hand-checked RAD cases, an LP cross-check of the
closed form, and a contract every registered strategy must keep."""
from __future__ import annotations

import pytest
import torch

from teachers.selection import (STRATEGIES, BudgetExceeded, BudgetLedger, RobustActiveDistillation, create_strategy,
                                entropy, gains, margin, rad_distribution)


def _close(actual: torch.Tensor, expected, atol: float = 1e-6) -> None:
    """allclose with both values in the message (torch.testing costs ~1 s of imports on first use)."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.double(), expected, atol=atol, rtol=0), f"{actual.tolist()} != {expected.tolist()}"



def _pool(n: int = 40, c: int = 5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(n, c, generator=g), dim=1)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the RAD rule


@pytest.mark.parametrize(
    "k, expected",
    [(1, [0.4, 0.6, 0.0]), (0, [1.0, 0.0, 0.0]), (2, [2 / 11, 3 / 11, 6 / 11])],  # k=2: ∝ 1/g = (.182, .273, .545)
)
def test_rad_distribution_hand_checked(k: int, expected: list[float]) -> None:
    p = rad_distribution(torch.tensor([0.9, 0.6, 0.3]), k)
    _close(p, torch.tensor(expected), atol=1e-6)


def test_rad_distribution_order_free_and_guarded() -> None:
    # same case, shuffled: probabilities follow the points, not the positions
    p = rad_distribution(torch.tensor([0.3, 0.9, 0.6]), 1)
    _close(p, torch.tensor([0.0, 0.4, 0.6]), atol=1e-6)
    # a zero gain (fully confident student) must not produce inf/nan, nor enter the support
    p = rad_distribution(torch.tensor([0.5, 0.0, 0.25]), 1)
    _close(p, torch.tensor([1 / 3, 0.0, 2 / 3]), atol=1e-6)
    # k >= n (every label may be wrong) is treated as k = n - 1: p ∝ 1/g over the whole pool
    for k in (2, 5):
        p = rad_distribution(torch.tensor([0.5, 0.0, 0.25]), k)
        assert torch.isfinite(p).all() and abs(float(p.sum()) - 1) < 1e-6 and (p > 0).all()


def _game_value(p: torch.Tensor, g: torch.Tensor, k: int) -> float:
    """Worst case over the adversary: drop the k largest p_i g_i."""
    contrib = (p.double() * g.double()).sort(descending=True).values
    return float(contrib[k:].sum())


def _lp_value(g: torch.Tensor, k: int) -> float:
    """max_p min_{|W|≤k} Σ_{i∉W} p_i g_i as an LP: the top-k sum is min_t k·t + Σ max(0, p_i g_i − t)."""
    linprog = pytest.importorskip("scipy.optimize").linprog
    n = g.numel()
    gd = g.double().tolist()
    # variables: p (n), u (n), t (1); maximise Σ p_i g_i − k t − Σ u_i
    cost = [-x for x in gd] + [1.0] * n + [float(k)]
    a_ub = []
    for i in range(n):  # p_i g_i − t − u_i ≤ 0
        row = [0.0] * (2 * n + 1)
        row[i], row[n + i], row[2 * n] = gd[i], -1.0, -1.0
        a_ub.append(row)
    a_eq = [[1.0] * n + [0.0] * (n + 1)]
    bounds = [(0, None)] * (2 * n) + [(None, None)]
    res = linprog(cost, A_ub=a_ub, b_ub=[0.0] * n, A_eq=a_eq, b_eq=[1.0], bounds=bounds, method="highs")
    assert res.status == 0
    return -float(res.fun)


@pytest.mark.parametrize("seed", range(6))
def test_rad_closed_form_solves_the_game(seed: int) -> None:
    g = torch.rand(9, generator=_gen(seed)) * 0.95 + 0.05
    for k in range(0, 9):
        p = rad_distribution(g, k)
        assert abs(float(p.sum()) - 1) < 1e-6 and (p >= 0).all()
        assert _game_value(p, g, k) == pytest.approx(_lp_value(g, k), abs=1e-7)


# ---------------------------------------------------------------- contract: every registered strategy


@pytest.mark.parametrize("name", STRATEGIES.names())
@pytest.mark.parametrize("budget", [0, 1, 7, 40])
def test_select_returns_budget_distinct_indices(name: str, budget: int) -> None:
    probs = _pool(40)
    idx = STRATEGIES.get(name)().select(probs, budget, _gen(1), teacher_error=0.2)
    assert idx.dtype == torch.long and idx.shape == (budget,)
    assert len(set(idx.tolist())) == budget
    assert all(0 <= i < 40 for i in idx.tolist())


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_select_rejects_impossible_budget(name: str) -> None:
    with pytest.raises(ValueError):
        STRATEGIES.get(name)().select(_pool(10), 11, _gen(), teacher_error=0.1)


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_select_is_reproducible_from_the_generator(name: str) -> None:
    s = STRATEGIES.get(name)()
    a = s.select(_pool(), 10, _gen(3), teacher_error=0.3)
    b = s.select(_pool(), 10, _gen(3), teacher_error=0.3)
    assert torch.equal(a, b)


def test_registry_has_the_four_strategies() -> None:
    assert STRATEGIES.names() == ["entropy", "margin", "rad", "random"]
    assert isinstance(create_strategy("rad", k=3), RobustActiveDistillation)


# ---------------------------------------------------------------- behaviour


def test_rad_with_no_teacher_errors_is_greedy_margin() -> None:
    probs = _pool(50, seed=4)
    for budget in (1, 5, 20):
        rad = STRATEGIES.get("rad")().select(probs, budget, _gen(), teacher_error=0.0)
        greedy = STRATEGIES.get("margin")().select(probs, budget, _gen())
        assert set(rad.tolist()) == set(greedy.tolist())
        lowest = torch.argsort(margin(probs))[:budget]
        assert set(rad.tolist()) == set(lowest.tolist())


def test_rad_samples_inside_the_support_with_the_right_frequencies() -> None:
    probs = _pool(30, seed=5)
    rad = RobustActiveDistillation(k=6)
    p = rad_distribution(gains(probs), 6)
    support = set(torch.nonzero(p).flatten().tolist())
    assert len(support) > 10
    assert set(rad.select(probs, 10, _gen()).tolist()) <= support
    # budget 1: one draw from p, so frequencies over many draws approach p
    gen, counts = _gen(7), torch.zeros(30)
    for _ in range(1000):
        counts[rad.select(probs, 1, gen)] += 1
    assert (counts / 1000 - p).abs().max() < 0.05


def test_rad_k_comes_from_teacher_error_or_is_required() -> None:
    assert RobustActiveDistillation().wrong_labels(1000, 0.123) == 123
    assert RobustActiveDistillation(k=7).wrong_labels(1000, 0.5) == 7
    with pytest.raises(ValueError, match="teacher_error"):
        RobustActiveDistillation().select(_pool(), 3, _gen())
    with pytest.raises(ValueError):
        RobustActiveDistillation(gain="variance")


def test_margin_and_entropy_pick_the_most_uncertain() -> None:
    confident = torch.tensor([0.97, 0.01, 0.01, 0.01])
    probs = confident.repeat(8, 1)
    probs[2] = torch.tensor([0.5, 0.48, 0.01, 0.01])  # torn between two classes: smallest margin
    probs[5] = torch.tensor([0.25, 0.25, 0.25, 0.25])  # flat: margin 0, entropy max
    probs[6] = torch.tensor([0.4, 0.3, 0.2, 0.1])  # spread: high entropy, margin 0.1
    m = STRATEGIES.get("margin")().select(probs, 2, _gen())
    assert set(m.tolist()) == {2, 5}
    e = STRATEGIES.get("entropy")().select(probs, 2, _gen())
    assert set(e.tolist()) == {5, 6}
    assert float(entropy(probs[5:6])) == pytest.approx(float(torch.log(torch.tensor(4.0))))


def test_entropy_gain_lies_in_unit_interval() -> None:
    g = gains(_pool(), "entropy")
    assert (g >= 0).all() and (g <= 1 + 1e-6).all()


# ---------------------------------------------------------------- ledger


def test_ledger_spends_exactly_up_to_the_boundary() -> None:
    ledger = BudgetLedger(images=10, teachers=3)  # 30 queries
    assert ledger.total == 30 and ledger.affordable_images() == 10
    assert ledger.spend(4) == 12
    assert ledger.spend(6) == 18  # exactly the budget: allowed
    assert ledger.remaining == 0 and ledger.rounds == [12, 18]
    with pytest.raises(BudgetExceeded, match="only 0 of 30 remain"):
        ledger.spend(1)
    assert ledger.spent == 30 and ledger.rounds == [12, 18]


def test_ledger_refuses_one_over_and_records_nothing() -> None:
    ledger = BudgetLedger(images=5)
    ledger.spend(3)
    with pytest.raises(BudgetExceeded):
        ledger.spend(3)  # 3 > 2 remaining
    assert ledger.spent == 3 and ledger.rounds == [3]
    ledger.spend(1, teachers=2)  # a round may query a subset of teachers
    assert ledger.remaining == 0
    with pytest.raises(ValueError):
        ledger.spend(-1)
