"""Which pool points to send to an expensive teacher when queries are budgeted.

A strategy scores the unlabelled pool with the *student's* probabilities and returns `budget`
distinct pool indices; only those are sent to the teacher. `BudgetLedger` counts what was spent.

`rad` is Robust Active Distillation (Baykal, Trinh, Iliopoulos, Menghani, Vee; ICLR 2023). Only the
paper's abstract was readable here: it confirms the setting (a teacher whose soft labels are often
wrong, a query budget), the aim (points both *informative* and *correctly labelled*), a
game-theoretic formulation and a parameter-free rule. The game and closed form in `rad_distribution`
are **our reading**, not checked against the paper's method section (see its docstring).
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from distill.registry import Registry

STRATEGIES: Registry[type] = Registry("selection strategy")

_EPS = 1e-12


class SelectionStrategy(Protocol):
    def select(
        self, student_probs: Tensor, budget: int, generator: torch.Generator, teacher_error: float | None = None
    ) -> Tensor: ...


def create_strategy(name: str, **options: object) -> SelectionStrategy:
    """Build a registered strategy by name; `options` go to its constructor (e.g. rad's `k`)."""
    return STRATEGIES.get(name)(**options)


# ---------------------------------------------------------------- scores (pure tensor functions)


def margin(probs: Tensor) -> Tensor:
    """Top-1 minus top-2 probability per row `[N]`; small = the student is torn between two classes."""
    if probs.shape[1] < 2:
        return torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device)
    top2 = probs.topk(2, dim=1).values
    return top2[:, 0] - top2[:, 1]


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy per row in nats `[N]`; 0·log 0 counts as 0."""
    return -(probs * probs.clamp_min(_EPS).log()).sum(dim=1)


def gains(probs: Tensor, kind: str = "margin") -> Tensor:
    """Informativeness in [0, 1]: `1 − margin` (default) or entropy / log C (the option)."""
    if kind == "margin":
        return 1.0 - margin(probs)
    if kind == "entropy":
        return entropy(probs) / math.log(max(probs.shape[1], 2))
    raise ValueError(f"unknown gain {kind!r}; expected 'margin' or 'entropy'")


# ---------------------------------------------------------------- the RAD rule


def rad_distribution(gains: Tensor, k: int) -> Tensor:
    """The learner's optimal sampling distribution `[N]` when an adversary can spoil `k` labels.

    Our reading of the RAD game (the paper's method section was not readable here): the learner
    picks p on the simplex to maximise the worst case  min_{|W|≤k} Σ_{i∉W} p_i g_i , where W are
    points the teacher labels wrongly (a wrong label gains nothing). The adversary removes the k
    largest p_i g_i, so an optimal p equalises p_i g_i on its support, and the support is a prefix
    of the points sorted by gain. With g sorted descending,
        V(m) = (m − k) / Σ_{j≤m} 1/g_(j),   m = k+1 … n;   m* = argmax V (smallest m on ties),
    and p_(j) ∝ 1/g_(j) for j ≤ m*, 0 elsewhere. k = 0 puts all mass on the top gain (greedy margin
    sampling); larger k spreads mass toward less extreme, more likely correctly labelled points.
    Checked against a linear-programming solution of the same game in tests/test_active.py.

    Gains are clamped to ≥ 1e-12 so a fully confident point costs no division by zero. k ≥ n means
    every label may be wrong (every p scores 0): we then treat k as n − 1, i.e. p ∝ 1/g everywhere.
    """
    if gains.dim() != 1 or gains.numel() == 0:
        raise ValueError(f"gains must be a non-empty 1-D tensor, got shape {tuple(gains.shape)}")
    if k < 0:
        raise ValueError(f"k (wrong teacher labels) must be >= 0, got {k}")
    n = gains.numel()
    k = min(k, n - 1)
    g = gains.detach().to(torch.float64).clamp_min(_EPS)
    order = torch.sort(g, descending=True, stable=True).indices
    inv_cum = torch.cumsum(1.0 / g[order], dim=0)  # Σ_{j≤m} 1/g_(j), m = 1..n
    m = torch.arange(1, n + 1, dtype=torch.float64, device=g.device)
    value = torch.where(m > k, (m - k) / inv_cum, torch.full_like(m, -math.inf))
    m_star = int(torch.argmax(value)) + 1
    p = torch.zeros(n, dtype=torch.float64, device=g.device)
    top = order[:m_star]
    p[top] = (1.0 / g[top]) / inv_cum[m_star - 1]
    return p.to(gains.dtype if gains.is_floating_point() else torch.float32)


def _check(student_probs: Tensor, budget: int) -> None:
    if student_probs.dim() != 2:
        raise ValueError(f"student_probs must be [N, C], got shape {tuple(student_probs.shape)}")
    if not 0 <= budget <= student_probs.shape[0]:
        raise ValueError(f"budget {budget} must lie in [0, pool size {student_probs.shape[0]}]")


def _top(scores: Tensor, budget: int) -> Tensor:
    """Indices of the `budget` largest scores, ties broken by lower index (stable, reproducible)."""
    return torch.sort(scores, descending=True, stable=True).indices[:budget].cpu()


# ---------------------------------------------------------------- registered strategies


@STRATEGIES.register("rad")
class RobustActiveDistillation:
    """Sample `budget` distinct points from `rad_distribution` without replacement.

    k (points the teacher gets wrong) is `round(teacher_error × N)` unless set here; teacher_error
    is 1 − the teacher's accuracy on the labelled set. If the support is smaller than the budget
    (e.g. k = 0), the top `budget` points by gain are taken, which contain the whole support.
    """

    def __init__(self, k: int | None = None, gain: str = "margin"):
        if k is not None and k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        gains(torch.full((1, 2), 0.5), gain)  # fail now on an unknown gain name
        self.k = k
        self.gain = gain

    def wrong_labels(self, pool_size: int, teacher_error: float | None) -> int:
        if self.k is not None:
            return self.k
        if teacher_error is None:
            raise ValueError("rad needs teacher_error (1 - teacher accuracy on the labelled set) or a fixed k")
        if not 0.0 <= teacher_error <= 1.0:
            raise ValueError(f"teacher_error must lie in [0, 1], got {teacher_error}")
        return round(teacher_error * pool_size)

    def select(
        self, student_probs: Tensor, budget: int, generator: torch.Generator, teacher_error: float | None = None
    ) -> Tensor:
        _check(student_probs, budget)
        g = gains(student_probs, self.gain)
        k = self.wrong_labels(student_probs.shape[0], teacher_error)
        p = rad_distribution(g, k).cpu()
        if budget == 0:
            return torch.empty(0, dtype=torch.long)
        if int((p > 0).sum()) < budget:
            return _top(g, budget)
        return torch.multinomial(p.double(), budget, replacement=False, generator=generator)


@STRATEGIES.register("margin")
class MarginSampling:
    """Greedy: the `budget` points with the smallest student margin (the classic baseline)."""

    def select(
        self, student_probs: Tensor, budget: int, generator: torch.Generator, teacher_error: float | None = None
    ) -> Tensor:
        _check(student_probs, budget)
        return _top(-margin(student_probs), budget)


@STRATEGIES.register("entropy")
class EntropySampling:
    """Greedy: the `budget` points with the highest student entropy."""

    def select(
        self, student_probs: Tensor, budget: int, generator: torch.Generator, teacher_error: float | None = None
    ) -> Tensor:
        _check(student_probs, budget)
        return _top(entropy(student_probs), budget)


@STRATEGIES.register("random")
class RandomSampling:
    """Uniform without replacement: the baseline every strategy must beat."""

    def select(
        self, student_probs: Tensor, budget: int, generator: torch.Generator, teacher_error: float | None = None
    ) -> Tensor:
        _check(student_probs, budget)
        return torch.randperm(student_probs.shape[0], generator=generator)[:budget]


# ---------------------------------------------------------------- budget accounting


class BudgetExceeded(RuntimeError):
    """A round asked for more teacher queries than the budget has left."""


class BudgetLedger:
    """Teacher-query budget: `images × teachers` queries in all, spent round by round.

    One query = one image sent to one teacher, the unit `QueryCost` counts. `spend` refuses (and
    records nothing) when a request would exceed what is left, so the reported total never lies.
    """

    def __init__(self, images: int, teachers: int = 1):
        if images < 0 or teachers < 1:
            raise ValueError(f"need images >= 0 and teachers >= 1, got images={images}, teachers={teachers}")
        self.teachers = teachers
        self.total = images * teachers
        self.rounds: list[int] = []

    @property
    def spent(self) -> int:
        return sum(self.rounds)

    @property
    def remaining(self) -> int:
        return self.total - self.spent

    def affordable_images(self, teachers: int | None = None) -> int:
        """How many more images can still go to `teachers` teachers (default: all of them)."""
        return self.remaining // (self.teachers if teachers is None else teachers)

    def spend(self, images: int, teachers: int | None = None) -> int:
        """Record one round of `images` sent to `teachers` teachers; returns the queries it cost."""
        teachers = self.teachers if teachers is None else teachers
        if images < 0 or teachers < 1:
            raise ValueError(f"need images >= 0 and teachers >= 1, got images={images}, teachers={teachers}")
        cost = images * teachers
        if cost > self.remaining:
            raise BudgetExceeded(
                f"round {len(self.rounds) + 1} asks for {cost} teacher queries ({images} images x {teachers} "
                f"teachers) but only {self.remaining} of {self.total} remain ({self.spent} spent)"
            )
        self.rounds.append(cost)
        return cost

    def __repr__(self) -> str:
        return f"BudgetLedger(spent={self.spent}, total={self.total}, rounds={self.rounds})"
