"""`EnsemblePool`: the MEAL V2 label source — the weighted mean of the teachers' softmax.

Weighting (`weighting`):
- `uniform`: every teacher counts the same (MEAL V2).
- `fixed`: the recipe's `weights`.
- `distill_weighted`: DistillWeighted as we read it (teachers/weighting.py): one weight per teacher,
  softmax(score / τ), the score being a kNN (or linear-probe) accuracy on the teacher's frozen
  features over a small labelled target subset. Computed once, in `fit`.
- `confidence`: per sample, a teacher counts in proportion to its confidence (max probability), or
  its probability on the true class where `confidence_targets` and the batch's targets allow.

A teacher trained for another label space (another class count, or other class names) cannot vote
in the target's classes directly: `fit` gives it a linear target head on its penultimate features
(timm's `forward_head(pre_logits=True)`, or an engine model's `embed`), fitted on the labelled
subset; its softmax is the teacher's pseudo-label in the target's classes. `heads="all"` reads every
teacher that way. Every call counts, per teacher, the images it was asked about and the seconds it
spent (fitting included), so a report can say what the labels cost.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import torch
from torch import nn

from teachers.source import QueryCost, SoftLabels
from teachers.teacher import Teacher
from teachers.weighting import POOL_WEIGHTINGS, fit_target_head, transferability_scores


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def target_subset(num_images: int, size: int, seed: int) -> torch.Tensor:
    """The labelled target images: the first `size` of a seeded permutation of the training set.

    Active distillation draws its labelled set from the same permutation, so a pool subset of
    size ≤ the labelled set lies inside it. Plain random (not stratified): choosing images by a
    label nobody has yet would use information a real user lacks.
    """
    if not 0 <= size <= num_images:
        raise ValueError(f"a labelled subset of {size} images does not fit a training set of {num_images}")
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))[:size]


def teacher_features(teacher: Teacher, images: torch.Tensor) -> torch.Tensor:
    """Penultimate features `[B, D]` (fp32) of a teacher on [0, 1] images, in its own preprocessing.

    timm models: `forward_head(forward_features(x), pre_logits=True)` (pooled, before the
    classifier); engine models with an `embed` method (ConvNet-3): that.
    """
    model, net = teacher.model, teacher.model.net
    with teacher.running(images) as x:  # the teacher's precision and memory format, as its logits
        x = model.preprocess(x)
        if hasattr(net, "forward_features") and hasattr(net, "forward_head"):
            feats = net.forward_head(net.forward_features(x), pre_logits=True)
        elif hasattr(net, "embed"):
            feats = net.embed(x)
        else:
            raise ValueError(f"teacher {teacher.name!r} ({model.arch}) exposes no features: needs timm's "
                             "forward_features/forward_head or an `embed` method")
    return feats.float().flatten(1)


class EnsemblePool:
    """`probs = Σ_j w_j softmax(z_j / T)`; `logits = Σ_j w_j z_j` (the MEAL V2 discriminator sees
    the mean of the teachers' logits). `w` per teacher, or per teacher and sample (`confidence`).

    `num_classes`/`class_names` are the target's (default: the teachers' common ones); a teacher
    that differs needs `fit` before it can label. `weight_temperature` is DistillWeighted's τ.
    """

    def __init__(self, teachers: list[Teacher], weights: list[float] | None = None, temperature: float = 1.0, *,
                 weighting: str | None = None, num_classes: int | None = None,
                 class_names: tuple[str, ...] | None = None, weight_temperature: float = 0.1,
                 score: str = "knn", score_k: int = 5, heads: str = "foreign", confidence_targets: bool = False):
        if not teachers:
            raise ValueError("a pool needs at least one teacher")
        weighting = weighting or ("fixed" if weights is not None else "uniform")
        if weighting not in POOL_WEIGHTINGS:
            raise ValueError(f"unknown weighting {weighting!r}; allowed: {', '.join(POOL_WEIGHTINGS.names())}")
        self.rule = POOL_WEIGHTINGS.get(weighting)()
        if heads not in ("foreign", "all"):
            raise ValueError(f"heads must be 'foreign' or 'all', got {heads!r}")
        if num_classes is None:
            classes = {t.num_classes for t in teachers}
            if len(classes) != 1:
                raise ValueError(f"teachers disagree on the class count: { {t.name: t.num_classes for t in teachers} }; "
                                 "give the target's num_classes and fit target heads")
            num_classes = classes.pop()
        self.teachers, self.temperature, self.weighting = teachers, temperature, weighting
        self.num_classes, self.class_names = num_classes, class_names
        self.weight_temperature, self.score, self.score_k = weight_temperature, score, score_k
        self.confidence_targets = confidence_targets
        self.foreign = [t.name for t in teachers if heads == "all" or self._differs(t)]
        self.weights = self.rule.initial(weights, len(teachers))
        self.heads: dict[str, nn.Linear] = {}
        self.scores: torch.Tensor | None = None
        self.fit_images = 0
        self._served = torch.zeros(len(teachers), dtype=torch.float64)  # Σ per-sample weights (report)
        self._served_rows = 0
        self.cost = QueryCost()

    def _differs(self, t: Teacher) -> bool:
        if t.num_classes != self.num_classes:
            return True
        return self.class_names is not None and tuple(t.model.class_names) != tuple(self.class_names)

    @property
    def needs_fit(self) -> bool:
        """True until `fit` has run, where weights or heads come from labelled target data."""
        return self.scores is None and (self.rule.needs_scores or bool(self.foreign))

    def to(self, device: torch.device | str) -> "EnsemblePool":
        for t in self.teachers:
            t.to(device)
        for h in self.heads.values():
            h.to(device)
        return self

    # ---------------------------------------------------------------- one pass over the teachers

    def _timed(self, name: str, images: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        _sync(images.device)
        start = time.perf_counter()
        out = fn(images)
        _sync(images.device)
        self.cost.add(name, len(images), time.perf_counter() - start)
        return out

    def teacher_logits(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each teacher's logits in the target's classes (through its head where it has one)."""
        if self.needs_fit:
            raise RuntimeError(f"pool weighting {self.weighting!r} with teachers {self.foreign} needs fit() on "
                               "labelled target images first (pool.labelled)")
        out = {}
        for t in self.teachers:
            if t.name in self.heads:
                head = self.heads[t.name]
                out[t.name] = self._timed(t.name, images, lambda x, t=t, head=head: head(teacher_features(t, x)))
            else:
                out[t.name] = self._timed(t.name, images, t.logits)
        return out

    # ---------------------------------------------------------------- fitting on labelled target data

    def fit(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> "EnsemblePool":
        """Target heads for teachers that need one, and DistillWeighted's weights, from the labelled
        target images (`[N, C, H, W]` in [0, 1]). Each teacher sees each image once (counted)."""
        if len(images) != len(targets) or len(images) < 2:
            raise ValueError(f"fit needs >= 2 labelled images with one target each, got {len(images)} images "
                             f"and {len(targets)} targets")
        if int(targets.min()) < 0 or int(targets.max()) >= self.num_classes:
            raise ValueError(f"targets must lie in [0, {self.num_classes}), got [{int(targets.min())}, "
                             f"{int(targets.max())}]")
        feats = []
        for t in self.teachers:
            parts = [self._timed(t.name, images[i:i + batch_size], lambda x, t=t: teacher_features(t, x))
                     for i in range(0, len(images), batch_size)]
            feats.append(torch.cat(parts).cpu())
        targets = targets.cpu()
        for t, f in zip(self.teachers, feats):
            if t.name in self.foreign:
                self.heads[t.name] = fit_target_head(f, targets, self.num_classes).to(images.device)
        self.scores = transferability_scores(feats, targets, method=self.score, k=self.score_k)
        fitted = self.rule.from_scores(self.scores, self.weight_temperature)
        if fitted is not None:
            self.weights = fitted
        self.fit_images = len(images)
        return self

    # ---------------------------------------------------------------- serving labels

    def soft_labels(self, images: torch.Tensor, targets: torch.Tensor | None = None,
                    index: torch.Tensor | None = None) -> SoftLabels:
        logits = self.teacher_logits(images)
        per_teacher = {n: torch.softmax(z / self.temperature, 1) for n, z in logits.items()}
        stacked_p = torch.stack(list(per_teacher.values()))  # [J, B, C]
        stacked_z = torch.stack(list(logits.values()))
        known = targets if (self.confidence_targets and targets is not None) else None
        w = self.rule.sample_weights(self.weights, stacked_p, known)  # [J, B]
        self._served += w.sum(dim=1).double().cpu()
        self._served_rows += len(images)
        # ops outside inference mode turn the teachers' inference tensors into normal ones,
        # which the loss may save for backward
        probs = (w[:, :, None] * stacked_p).sum(0)
        mean_logits = (w[:, :, None] * stacked_z).sum(0)
        return SoftLabels(probs=probs, logits=mean_logits, per_teacher=per_teacher)

    def report(self) -> dict[str, Any]:
        """What the run report shows: the weighting, each teacher's weight (for `confidence`, its
        mean per-sample weight over the labels this process served, None if it served none),
        scores and heads where fitted."""
        names = [t.name for t in self.teachers]
        out: dict[str, Any] = {"weighting": self.weighting, "heads": sorted(self.heads)}
        if self.rule.per_sample:
            # measured on what this process served: a run resumed after its last epoch served none
            out["served_rows"] = self._served_rows
            w = (self._served / self._served_rows).tolist() if self._served_rows else [None] * len(names)
        else:
            w = self.weights.tolist()
        out["weights"] = dict(zip(names, w))
        if self.scores is not None:
            out["scores"] = dict(zip(names, self.scores.tolist()))
            out["score"] = f"{self.score} (k={self.score_k}) on {self.fit_images} labelled target images"
        if self.rule.needs_scores:
            out["temperature"] = self.weight_temperature
        return out
