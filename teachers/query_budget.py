"""`ActiveQuerySource`: a label source that asks its teachers only about images a round paid for.

It wraps any `LabelSource` (one teacher, an ensemble, a weighted or calibrated pool) and owns the
`BudgetLedger`. `query` is the only path to the inner source: it spends from the ledger *before*
any teacher runs (so an over-budget request costs nothing and records nothing), sends exactly the
selected images, and caches their soft labels by dataset index. `soft_labels` then serves those
cached labels for any view of an already-queried image and never calls a teacher: a row whose
image was never queried comes back masked out.

Accounting is checked, not assumed: after every query the inner source's own `QueryCost` must
have grown by exactly `images × teachers`, and the ledger's total must equal it. A source that
queries more than it is asked (e.g. several crops per image) is refused with a clear error.

One query = one whole image sent to one teacher. Training views (random crops) of a queried image
reuse that image's label; re-asking the teacher per crop would multiply the cost per epoch.
"""
from __future__ import annotations

import time
from typing import Any

import torch

from teachers.selection import BudgetLedger
from teachers.source import LabelSource, QueryCost, SoftLabels


class ActiveQuerySource:
    """Budgeted, cached access to `source`: at most `budget_images × teachers` queries in all."""

    def __init__(self, source: LabelSource, budget_images: int, teachers: int):
        if teachers < 1:
            raise ValueError(f"need at least one teacher, got {teachers}")
        self.source, self.teachers, self.num_classes = source, teachers, source.num_classes
        self.ledger = BudgetLedger(budget_images, teachers)
        self.spends: list[dict[str, Any]] = []  # one entry per ledger round, in order
        self._slot: dict[int, int] = {}  # dataset index → row of the cache
        self._index = torch.empty(0, dtype=torch.long)
        self._probs = torch.empty(0, self.num_classes)

    @property
    def cost(self) -> QueryCost:
        """The inner source's counters: the images each teacher actually saw, and its seconds."""
        return self.source.cost

    @property
    def queried(self) -> torch.Tensor:
        """Dataset indices whose soft labels are cached, in query order."""
        return self._index.clone()

    # ---------------------------------------------------------------- spending

    def _check_books(self) -> None:
        if self.cost.total_queries != self.ledger.spent:
            raise RuntimeError(f"query accounting broke: the label source counted {self.cost.total_queries} teacher "
                               f"queries, the ledger {self.ledger.spent}; a wrapped source must query each "
                               f"image once per teacher")

    def charge(self, name: str, images: int, seconds: float = 0.0) -> int:
        """Book queries the inner source already made outside `query` (e.g. fitting the pool's
        weights on the labelled set) so the ledger covers every teacher query."""
        cost = self.ledger.spend(images)
        self.spends.append({"name": name, "images": images, "queries": cost, "seconds": seconds})
        self._check_books()
        return cost

    def query(self, images: torch.Tensor, index: torch.Tensor, name: str, targets: torch.Tensor | None = None,
              batch_size: int = 256) -> torch.Tensor:
        """Send `images` (`[N, C, H, W]` in [0, 1], dataset indices `index`) to the teachers once;
        cache and return their probabilities `[N, num_classes]` (CPU). `targets` only where known
        (the labelled set): unlabelled images are queried without them."""
        index = index.detach().long().cpu().flatten()
        if len(images) != len(index):
            raise ValueError(f"{len(images)} images but {len(index)} indices")
        if len(torch.unique(index)) != len(index):
            raise ValueError(f"{name}: an image appears twice in one query")
        again = [i for i in index.tolist() if i in self._slot]
        if again:
            raise ValueError(f"{name}: images {again[:5]} were already queried; their labels are cached")
        self.ledger.spend(len(index))  # raises BudgetExceeded before any teacher runs
        before, start = self.cost.total_queries, time.perf_counter()
        parts = []
        for i in range(0, len(index), batch_size):
            t = None if targets is None else targets[i:i + batch_size]
            parts.append(self.source.soft_labels(images[i:i + batch_size], t, index[i:i + batch_size])
                         .probs.detach().float().cpu())
        probs = torch.cat(parts) if parts else torch.empty(0, self.num_classes)
        got = self.cost.total_queries - before
        if got != len(index) * self.teachers:
            raise RuntimeError(f"{name}: {len(index)} images × {self.teachers} teachers should cost "
                               f"{len(index) * self.teachers} queries, the label source counted {got}")
        self.spends.append({"name": name, "images": len(index), "queries": got,
                            "seconds": time.perf_counter() - start})
        self._check_books()
        self._store(index, probs)
        return probs

    def _store(self, index: torch.Tensor, probs: torch.Tensor) -> None:
        offset = len(self._index)
        for row, i in enumerate(index.tolist()):
            self._slot[i] = offset + row
        self._index = torch.cat([self._index, index])
        self._probs = torch.cat([self._probs, probs])

    # ---------------------------------------------------------------- serving cached labels

    def lookup(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cached probabilities `[B, C]` (CPU) for dataset indices, and which rows were queried."""
        index = index.detach().long().cpu().flatten()
        rows = torch.tensor([self._slot.get(i, -1) for i in index.tolist()], dtype=torch.long)
        known = rows >= 0
        probs = torch.zeros(len(index), self.num_classes)
        if known.any():
            probs[known] = self._probs[rows[known]]
        return probs, known

    def soft_labels(self, images: torch.Tensor, targets: torch.Tensor | None = None,
                    index: torch.Tensor | None = None) -> SoftLabels:
        """Cached labels only (never a teacher call); rows never queried are masked out."""
        if index is None:
            raise ValueError("ActiveQuerySource serves labels by dataset index: pass `index`")
        probs, known = self.lookup(index)
        return SoftLabels(probs=probs.to(images.device), mask=known.to(images.device))

    # ---------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        return {"index": self._index.clone(), "probs": self._probs.clone(),
                "rounds": list(self.ledger.rounds), "spends": [dict(s) for s in self.spends],
                "cost": {"queries": dict(self.cost.queries), "seconds": dict(self.cost.seconds)}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the cache, the ledger and the inner source's counters as they were saved."""
        self._slot = {}
        self._index, self._probs = torch.empty(0, dtype=torch.long), torch.empty(0, self.num_classes)
        self._store(state["index"].long().flatten(), state["probs"].float().reshape(-1, self.num_classes))
        self.ledger.rounds = [int(r) for r in state["rounds"]]
        self.spends = [dict(s) for s in state["spends"]]
        self.cost.queries.clear()
        self.cost.queries.update({k: int(v) for k, v in state["cost"]["queries"].items()})
        self.cost.seconds.clear()
        self.cost.seconds.update({k: float(v) for k, v in state["cost"]["seconds"].items()})
        self._check_books()
