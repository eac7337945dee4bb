"""How much each teacher's soft label counts when several sources label the same target data.

DistillWeighted (Borup, Phoo, Hariharan; ICCV 2023, "Distilling from Similar Tasks for Transfer
Learning on a Budget"). Only the paper's abstract was readable here. What it confirms: source
models trained on other domains are distilled into one small target model, weighted by their
*relevance for the target task*, measured with task-similarity metrics; no source data is used,
only the sources' *features and pseudo-labels*; picking the single most similar source is
DistillNearest. Everything else below is **our reading**: relevance = accuracy of a cheap
classifier (leave-one-out kNN, or a cross-validated linear probe) on each source's frozen features
over the labelled target set; weights = softmax(score / τ) (τ → 0 gives DistillNearest, τ → ∞ the
uniform average); a source with a different label space gets a linear target head fitted on its
features (`fit_target_head`), whose outputs are its pseudo-labels in the target's classes. We did
not build feature distillation through a learned projection.

`confidence_weights` (per-sample: teachers right on this sample count more) and `uniform_weights`
(the plain average, as in MEAL V2) are the related modes; neither is from the DistillWeighted paper.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.registry import Registry


def _labels(targets: Tensor, n: int) -> Tensor:
    if targets.dim() != 1 or targets.numel() != n:
        raise ValueError(f"targets must be [N] with N={n}, got shape {tuple(targets.shape)}")
    return targets.long().cpu()


def knn_loo_accuracy(features: Tensor, targets: Tensor, k: int = 5) -> float:
    """Leave-one-out accuracy of a cosine k-nearest-neighbour vote on `features` `[N, D]`.

    Each sample is classified by its k most similar *other* samples; ties between classes go to
    the class whose neighbours rank nearer. Needs no training, so it scores any source cheaply.
    """
    n = features.shape[0]
    y = _labels(targets, n)
    if n < 2:
        raise ValueError("leave-one-out needs at least 2 labelled samples")
    k = max(1, min(k, n - 1))
    f = F.normalize(features.detach().float().cpu().flatten(1), dim=1)
    sim = f @ f.T
    sim.fill_diagonal_(-float("inf"))  # leave the sample itself out
    nbr = sim.topk(k, dim=1).indices  # [N, k], nearest first
    # vote weight 1 + ε·(k − rank): counts decide, nearer neighbours only break ties (ε·k² < 1)
    eps = 1.0 / (k * k + 1)
    w = 1.0 + eps * (k - torch.arange(k, dtype=torch.float32))
    votes = torch.zeros(n, int(y.max()) + 1).scatter_add_(1, y[nbr], w.expand(n, k))
    return float((votes.argmax(dim=1) == y).float().mean())


def linear_probe_accuracy(features: Tensor, targets: Tensor, folds: int = 5, seed: int = 0) -> float:
    """Stratified k-fold accuracy of a logistic-regression probe on standardised features.

    Folds shrink to the size of the smallest class (at least 2) so every fold can see every class.
    """
    from sklearn.linear_model import LogisticRegression  # heavy: loaded only where a probe or digits need it
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = features.detach().float().cpu().flatten(1).numpy()
    y = _labels(targets, x.shape[0]).numpy()
    smallest = int(torch.unique(torch.from_numpy(y), return_counts=True)[1].min())
    cv = StratifiedKFold(n_splits=max(2, min(folds, smallest)), shuffle=True, random_state=seed)
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return float(cross_val_score(probe, x, y, cv=cv).mean())


def transferability_scores(features: list[Tensor], targets: Tensor, method: str = "knn", k: int = 5) -> Tensor:
    """Relevance score `[J]` of each source: a cheap classifier's accuracy on its frozen features.

    `features[j]` is `[N, D_j]`, source j's features of the N labelled target samples. `method`:
    "knn" (default; leave-one-out cosine kNN, `k` neighbours) or "linear" (logistic regression,
    `k`-fold cross-validation). Our reading of DistillWeighted's task-similarity score.
    """
    if not features:
        raise ValueError("need the features of at least one source")
    if method == "knn":
        scores = [knn_loo_accuracy(f, targets, k=k) for f in features]
    elif method == "linear":
        scores = [linear_probe_accuracy(f, targets, folds=k) for f in features]
    else:
        raise ValueError(f"unknown transferability method {method!r}; expected 'knn' or 'linear'")
    return torch.tensor(scores, dtype=torch.float32)


def distill_weighted(scores: Tensor, temperature: float) -> Tensor:
    """Source weights α = softmax(scores / τ) `[J]`: sharper as τ → 0 (DistillNearest), uniform as τ → ∞.

    Only differences between scores matter, so adding a constant to every score changes nothing.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return torch.softmax(scores.float() / temperature, dim=0)


def uniform_weights(num_teachers: int) -> Tensor:
    """Every teacher counts the same `[J]` (the MEAL V2 average)."""
    if num_teachers < 1:
        raise ValueError(f"need at least one teacher, got {num_teachers}")
    return torch.full((num_teachers,), 1.0 / num_teachers)


def confidence_weights(per_teacher_probs: Tensor, targets: Tensor | None = None) -> Tensor:
    """Per-sample teacher weights `[J, B]`, each column summing to 1 over the J teachers.

    Where the target is known, weight ∝ the teacher's probability on the true class (a teacher
    right on this sample counts more). Where it is unknown (`targets` is None, or an entry is < 0),
    weight ∝ the teacher's max probability, i.e. its own confidence, which cannot tell a confident
    wrong teacher from a right one. If every teacher gives the true class probability 0, the
    sample falls back to uniform weights.
    """
    if per_teacher_probs.dim() != 3:
        raise ValueError(f"per_teacher_probs must be [J, B, C], got shape {tuple(per_teacher_probs.shape)}")
    j, b, _ = per_teacher_probs.shape
    conf = per_teacher_probs.max(dim=2).values  # [J, B]
    if targets is not None:
        if targets.shape != (b,):
            raise ValueError(f"targets must be [B] with B={b}, got shape {tuple(targets.shape)}")
        known = targets >= 0
        idx = targets.clamp_min(0).long().view(1, b, 1).expand(j, b, 1)
        on_true = per_teacher_probs.gather(2, idx).squeeze(2)
        conf = torch.where(known.unsqueeze(0), on_true, conf)
    total = conf.sum(dim=0, keepdim=True)
    uniform = torch.full_like(conf, 1.0 / j)
    return torch.where(total > 0, conf / total.clamp_min(1e-12), uniform)


def fit_target_head(features: Tensor, targets: Tensor, num_classes: int, weight_decay: float = 1e-4) -> nn.Linear:
    """A frozen linear head mapping a source's features `[N, D]` to the target's `num_classes` logits.

    For a source whose label space differs from the target's: softmax(head(features)) becomes its
    pseudo-label in the target's classes. Multinomial logistic regression (mean cross-entropy +
    `weight_decay`·‖W‖²) on standardised features, by sklearn's L-BFGS (convex, deterministic); the
    standardisation is folded into the weights, so the head takes raw features. A target class
    absent from `targets` gets zero weights and a bias 30 below the lowest fitted one (≈ probability
    0): the labelled set gives no evidence for it.
    """
    from sklearn.linear_model import LogisticRegression  # heavy: loaded only where a probe or digits need it

    x = features.detach().double().cpu().flatten(1)
    y = _labels(targets, x.shape[0])
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp_min(1e-6)
    seen = torch.unique(y)
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64)
    b = torch.zeros(num_classes, dtype=torch.float64)
    if seen.numel() > 1:
        # sklearn minimises ½‖W‖² + C·Σ loss; ours is mean loss + wd·‖W‖², hence C = 1 / (2·wd·N)
        clf = LogisticRegression(C=1.0 / (2 * weight_decay * x.shape[0]), max_iter=1000)
        clf.fit(((x - mean) / std).numpy(), y.numpy())
        coef, icpt = torch.from_numpy(clf.coef_), torch.from_numpy(clf.intercept_)
        if seen.numel() == 2:  # sklearn keeps one logit z for two classes: softmax(0, z) is the same
            coef, icpt = torch.cat([torch.zeros_like(coef), coef]), torch.cat([torch.zeros_like(icpt), icpt])
        w[seen], b[seen] = coef, icpt
    unseen = torch.ones(num_classes, dtype=torch.bool)
    unseen[seen] = False
    b[unseen] = b[seen].min() - 30.0
    head = nn.Linear(x.shape[1], num_classes)
    with torch.no_grad():  # W (x − μ)/σ + b  =  (W/σ) x + (b − (W/σ) μ)
        head.weight.copy_(w / std)
        head.bias.copy_(b - (w / std) @ mean)
    return head.requires_grad_(False)


# ---------------------------------------------------------------- the pool's weighting rules


class Weighting:
    """How an `EnsemblePool` weighs its teachers (`pool.weighting`). The base is `uniform`.

    `initial`: the per-teacher weights `[J]` before any fit; `from_scores`: new weights once the
    pool has scored its teachers on labelled target data (None: keep them); `per_sample`: weights
    `[J, B]` for one batch of per-teacher probabilities `[J, B, C]`."""

    needs_scores = False  # weights come from the fit on labelled target data
    per_sample = False  # weights vary per sample (the report shows their mean over what was served)

    def initial(self, weights: list[float] | None, num_teachers: int) -> Tensor:
        if weights is not None:
            raise ValueError(f"weights are given exactly when weighting is 'fixed' (weighting {self.name!r})")
        return uniform_weights(num_teachers)

    def from_scores(self, scores: Tensor, temperature: float) -> Tensor | None:
        return None

    def sample_weights(self, weights: Tensor, per_teacher_probs: Tensor, targets: Tensor | None) -> Tensor:
        return weights.to(per_teacher_probs.device)[:, None].expand(per_teacher_probs.shape[:2])

    @property
    def name(self) -> str:
        return type(self).registered_name


POOL_WEIGHTINGS: Registry[type[Weighting]] = Registry("pool weighting")


def register_weighting(name: str):
    def add(cls: type[Weighting]) -> type[Weighting]:
        cls.registered_name = name
        return POOL_WEIGHTINGS.register(name)(cls)

    return add


register_weighting("uniform")(Weighting)  # every teacher counts the same (MEAL V2)


@register_weighting("fixed")
class FixedWeighting(Weighting):
    """The recipe's `weights`, normalised."""

    def initial(self, weights: list[float] | None, num_teachers: int) -> Tensor:
        if weights is None:
            raise ValueError("weights are given exactly when weighting is 'fixed' (weighting 'fixed')")
        w = torch.tensor(weights, dtype=torch.float32)
        return w / w.sum()


@register_weighting("distill_weighted")
class DistillWeighted(Weighting):
    """One weight per teacher: softmax(score / τ) of its task-similarity score (`distill_weighted`)."""

    needs_scores = True

    def from_scores(self, scores: Tensor, temperature: float) -> Tensor | None:
        return distill_weighted(scores, temperature)


@register_weighting("confidence")
class ConfidenceWeighting(Weighting):
    """Per sample: a teacher counts in proportion to its confidence (`confidence_weights`)."""

    per_sample = True

    def sample_weights(self, weights: Tensor, per_teacher_probs: Tensor, targets: Tensor | None) -> Tensor:
        return confidence_weights(per_teacher_probs, targets)
