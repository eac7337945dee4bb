"""Active distillation: rounds of select → query the teachers for those images only → train.

`run_active(cfg)` is what `distill train` runs when a recipe's label source is `active` (this
module registers it: `ActiveLabels`, options `ActiveConfig`). The training
set splits into a labelled set L (`labels.active.labelled` images, the first of a seeded
permutation, with their labels) and an unlabelled pool U (the rest; their labels are never read —
only a diagnostic in the report compares teacher labels with them). Then:

- setup: if the pool's weighting or heads need labelled target data, they are fitted on the
  first `pool.labelled` images of L; those teacher queries are booked first;
- calibration: `rad` without a given `k`/`teacher_error` sends L to the teachers once and takes
  k = (1 − teacher accuracy on L) × (unqueried pool images) (METHODS.md);
- round 0 trains the student on L alone (skipped when L is empty);
- rounds 1…R: the student scores every unqueried pool image (no teacher), the strategy picks this
  round's share of the budget, `ActiveQuerySource.query` sends exactly those, and the student
  trains `trainer.epochs` epochs on L ∪ (everything queried so far): a labelled image's target is
  its one-hot label, a queried image's the teachers' cached soft label, one soft-CE (or KD) mean
  over the batch — i.e. CE on L plus KD on the queried points (`round_images` repeats a small
  round's set so each epoch has at least that many images: early rounds still train enough steps).

Each round is an ordinary `Trainer` run in `rounds/round<r>/` (checkpoints, resume, metrics); the
selections, the label cache and the ledger are saved after every query, so a killed job resumes
where it stopped without re-querying. The budget left after setup and calibration is split evenly
over the rounds (earlier rounds take the remainder).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch.utils.data import DataLoader, Dataset

from distill.artefacts import load_state, save_state, write_text
from distill.augment import RandomCrops
from distill.config import RunConfig, Strict, dump_config
from distill.data import ImageSet, load_data
from distill.distributed import check_precision, resolve_device
from distill.errors import ArtefactError, ConfigError
from distill.imagefiles import ImageFiles
from distill.models import save_model
from distill.report import markdown_table, write_run_report
from distill.teacher_pool import build_pool, check_checkpoints, fit_pool
from students.build import RunResult, create_backend, create_step
from students.step import DistillStep
from students.trainer import Trainer, seed_for
from teachers.labeling import PoolLabels, labeling_for, register_labeler
from teachers.pool import EnsemblePool, target_subset
from teachers.query_budget import ActiveQuerySource
from teachers.selection import STRATEGIES, RobustActiveDistillation, SelectionStrategy, create_strategy
from teachers.source import Batch, QueryCost, SoftLabels, Views, as_loaded

_SELECT_STREAM = 700_000  # selection generators use seed_for(seed, this + round): apart from epoch seeds


class ActiveConfig(Strict):
    """Budgeted teacher queries (Robust Active Distillation; `distill.active_rounds`). The training set
    is split into `labelled` images with their labels (L, a seeded subset) and an unlabelled pool
    U. Round 0 trains on L; each of `rounds` rounds then scores U with the student, picks images
    with `strategy`, sends only those to the pool and trains the student (CE on L + KD on every
    image queried so far; `trainer.epochs` per round). At most ⌊budget·|U|⌋ images × teachers
    queries are spent in all, including queries on L (pool weighting fit, rad's teacher error)."""

    budget: float = Field(gt=0, le=1)  # fraction of the unlabelled pool's images
    rounds: int = Field(4, ge=1)
    strategy: str = "rad"  # a name in teachers.selection.STRATEGIES
    options: dict[str, int | float | str] = {}  # the strategy's arguments, e.g. rad: {k: 50, gain: entropy}
    labelled: int = Field(0, ge=0)
    # rad's k = teacher_error × |U|; None: measured on L (|L| × teachers queries from the budget)
    teacher_error: float | None = Field(None, ge=0, le=1)
    warm_start: bool = True  # each round continues the previous student (False: a fresh init)
    # an epoch of a round covers at least this many images (the round's set repeated), so the small
    # early rounds train as many steps as later ones; 0: one pass over the set
    round_images: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _strategy(self) -> "ActiveConfig":
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {self.strategy!r}; allowed: {', '.join(STRATEGIES.names())}")
        try:
            create_strategy(self.strategy, **self.options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"options {self.options} do not fit strategy {self.strategy!r}: {err}") from None
        return self



@register_labeler("active")
class ActiveLabels(PoolLabels):
    """Budgeted queries to the recipe's pool in rounds: a job of its own (`run_active`), whose
    rounds each train with an `ActiveLabeler`."""

    Options = ActiveConfig

    def check(self, run: RunConfig) -> None:
        a = self.options
        if run.trainer.backend != "plain":
            raise ValueError("labels.active trains in rounds in one process; use trainer.backend: plain")
        if run.pool is None:
            raise ValueError("labels.active queries a teacher pool: set pool.teachers")
        if run.loss.hard_ce > 0 or run.loss.discriminator != "none":
            raise ValueError("labels.active trains with CE on the labelled set and KD on queried images only: "
                             "set loss.hard_ce: 0 and loss.discriminator: none")
        if run.pool.labelled > a.labelled:
            raise ValueError(f"pool.labelled ({run.pool.labelled}) must be <= labels.active.labelled "
                             f"({a.labelled}): the pool's target subset must come from the labelled set")
        if a.strategy == "rad" and "k" not in a.options and a.teacher_error is None and a.labelled == 0:
            raise ValueError("labels.active: rad needs the teacher's error rate: set labels.active.labelled > 0 "
                             "(measured there), labels.active.teacher_error, or labels.active.options.k")

    def build(self, ctx):
        raise TypeError("labels.active trains in rounds: run_job builds one ActiveLabeler per round")

    def run_job(self, cfg: RunConfig, data: tuple[ImageSet, ImageSet] | None = None) -> RunResult:
        return run_active(cfg, data, self.options)

    def report(self, summary: dict[str, Any]) -> list[str]:
        return super().report(summary) + active_budget_section(summary.get("active"))


class Members(Dataset):
    """Training images `members` (dataset indices) of `base`; only the first `labelled` keep their
    targets, the others read −1 so no pool label can reach a loss. Items carry their position in
    `members`. `min_len` repeats the list so one epoch covers at least that many items."""

    def __init__(self, base: Dataset, members: torch.Tensor, labelled: int, min_len: int = 0):
        self.base, self.members, self.labelled = base, members.long(), labelled
        self.length = len(self.members) * max(1, math.ceil(min_len / max(len(self.members), 1)))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        i = i % len(self.members)
        image, target, _ = self.base[int(self.members[i])]
        return image, (int(target) if i < self.labelled else -1), i


class MemberFiles(ImageFiles):
    """`Members` of an image-file set, as image files: the trainer cuts each round's training views
    from the whole decoded photo (`TrainViews`), as for any image-file run, not from the centre
    square that `base[i]` (the evaluation view) is. Item i is `members[i % len(members)]`, its
    target −1 past the first `labelled`; views carry i (the labeler takes it mod len(members))."""

    def __init__(self, base: ImageFiles, members: torch.Tensor, labelled: int, min_len: int = 0):
        super().__init__(base.image_size, base.channels, base.eval_transform, base.on_bad_image)
        self.base, self.class_names = base, base.class_names
        self.order = members.long().repeat(max(1, math.ceil(min_len / max(len(members), 1))))
        position = torch.arange(len(self.order)) % max(len(members), 1)
        self.targets = torch.where(position < labelled, base.targets[self.order], -1)

    def read(self, i: int) -> tuple[bytes, bool]:
        return self.base.read(int(self.order[i]))

    def name(self, i: int) -> str:
        return self.base.name(int(self.order[i]))


def round_set(base: Dataset, members: torch.Tensor, labelled: int, min_len: int) -> Dataset:
    """A round's training set: image files stay image files (views cut from the photo)."""
    if isinstance(base, ImageFiles):
        return MemberFiles(base, members, labelled, min_len)
    return Members(base, members, labelled, min_len)


def gather(dataset: Dataset, index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The images at dataset indices `index` as float `[N, C, H, W]` in [0, 1] on `device`."""
    if len(index) == 0:
        raise ValueError("no images to gather")
    return torch.stack([dataset[int(i)][0] for i in index]).to(device).float().div_(255)


@torch.inference_mode()
def student_probs(model: torch.nn.Module, dataset: Dataset, index: torch.Tensor, batch_size: int,
                  device: torch.device) -> torch.Tensor:
    """The student's softmax `[N, C]` (CPU) on whole images: how it scores the unqueried pool."""
    was_training = model.training
    model.eval()
    out = []
    for images, _, _ in DataLoader(Members(dataset, index, 0), batch_size=batch_size):
        out.append(torch.softmax(model(images.to(device).float() / 255).float(), 1).cpu())
    model.train(was_training)
    return torch.cat(out)


class ActiveLabeler:
    """A round's batch labeler: fresh views (`views`: random crops; image files arrive cut from the
    photo); one-hot labels for labelled rows, the cached teacher label of the whole image for
    queried rows. Never queries: the round paid before training."""

    def __init__(self, views: Views, source: ActiveQuerySource, members: torch.Tensor, labelled: int,
                 cost: QueryCost):
        self.views, self.source, self.members, self.labelled = views, source, members, labelled
        self.cost = cost  # what was spent up to this round (the trainer logs it per epoch)

    def __call__(self, images, targets, index, epoch, generator) -> Batch:
        views = self.views(images, generator)
        index = index.cpu() % len(self.members)
        is_labelled = index < self.labelled
        probs, known = self.source.lookup(self.members[index])
        if not bool((known | is_labelled).all()):
            raise RuntimeError("a training image has neither a label nor a queried soft label")
        onehot = F.one_hot(targets.cpu().clamp_min(0), self.source.num_classes).float()
        probs = torch.where(is_labelled[:, None], onehot, probs)
        return Batch(views, targets, SoftLabels(probs=probs.to(views.device)))


def plan_rounds(images: int, rounds: int) -> list[int]:
    """`images` split over `rounds` as evenly as possible, earlier rounds taking the remainder."""
    base, extra = divmod(images, rounds)
    return [base + (r < extra) for r in range(rounds)]


def needs_teacher_error(strategy: Any) -> bool:
    """rad without a fixed k derives k from the teacher's error rate; other strategies ignore it."""
    return isinstance(strategy, RobustActiveDistillation) and strategy.k is None


def _budget(a: ActiveConfig, pool_size: int, setup: int, calibration: int) -> tuple[int, list[int]]:
    """(images the budget allows, images per round), refused before compute when it cannot work."""
    total = math.floor(a.budget * pool_size)
    left = total - setup - calibration
    if left < a.rounds:
        raise ConfigError(
            f"labels.active.budget: {a.budget} × {pool_size} pool images allows {total} images per teacher; "
            f"{setup} go to fitting the pool weighting (pool.labelled), {calibration} to measuring the teacher "
            f"error on the labelled set, leaving {max(left, 0)} for {a.rounds} rounds (need >= 1 per round): "
            f"raise the budget, lower rounds, or set labels.active.teacher_error")
    return total, plan_rounds(left, a.rounds)


def _load_job_state(path: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The saved books of this job, refused when another recipe wrote them; a resume may change the
    keys of `distill.config.RESUMABLE`, as a plain run's may. A plain run's directory is refused."""
    plain = cfg.run_dir / "checkpoints" / "last.safetensors"
    if plain.exists():
        raise ArtefactError(f"{cfg.run_dir}: holds a `distill train` run without labels.active ({plain}); use another "
                            f"`name`/`out_dir`")
    if not path.exists():
        return None
    state, meta = load_state(path)
    cfg.check_written_by(path, meta)
    return state


@dataclass
class ActiveJob:
    """One job's fixed parts (data split, strategy, pool, budget plan) and its books (the budgeted
    source, selections, teacher error), saved after every query so a killed job resumes."""

    cfg: RunConfig
    opts: ActiveConfig
    device: torch.device
    train: ImageSet
    test: ImageSet
    labelled: torch.Tensor  # dataset indices of L
    pool_idx: torch.Tensor  # dataset indices of U
    strategy: SelectionStrategy
    pool: EnsemblePool
    source: ActiveQuerySource
    plan: list[int]  # images per round
    teacher_error: float | None
    selections: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def state_path(self) -> Path:
        return self.cfg.run_dir / "active" / "state.safetensors"

    def save(self) -> None:
        save_state(self.state_path, {"source": self.source.state_dict(), "teacher_error": self.teacher_error,
                                     "selections": {str(k): v for k, v in self.selections.items()}},
                   {"config_hash": self.cfg.hash(), "resume_hash": self.cfg.resume_hash()})


def prepare_job(cfg: RunConfig, opts: ActiveConfig, data: tuple[ImageSet, ImageSet] | None) -> ActiveJob:
    """Split the data, build the pool, plan the budget (refused before any query), and restore the
    books of a killed job or pay for setup (pool fit) and calibration (teacher error on L). Books
    written by another recipe are refused before anything is written to the run directory."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # every rank would select and query on its own
        raise ConfigError("labels.active runs in one process (it queries teachers between trainer runs); "
                          "launch it without torchrun/deepspeed")
    device = resolve_device(cfg.device)
    check_precision(cfg.precision, device)
    train_set, test_set = data or load_data(cfg.data)
    check_checkpoints(cfg, train_set.num_classes)
    n = len(train_set)
    if opts.labelled >= n:
        raise ConfigError(f"labels.active.labelled: {opts.labelled} leaves no unlabelled pool in {n} training images")
    order = target_subset(n, n, cfg.seed)  # pool.labelled's subset is a prefix of the same order
    labelled, pool_idx = order[:opts.labelled], order[opts.labelled:].sort().values
    strategy = create_strategy(opts.strategy, **opts.options)
    need_error = opts.teacher_error is None and needs_teacher_error(strategy)

    pool = build_pool(cfg, train_set, device, fit=False)
    setup = cfg.pool.labelled if pool.needs_fit else 0
    budget_images, plan = _budget(opts, len(pool_idx), setup, opts.labelled if need_error else 0)
    job = ActiveJob(cfg, opts, device, train_set, test_set, labelled, pool_idx, strategy, pool,
                    ActiveQuerySource(pool, budget_images, len(cfg.pool.teachers)), plan, opts.teacher_error)
    state = _load_job_state(job.state_path, cfg)  # another recipe's run directory: refused, nothing written
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    write_text(cfg.run_dir / "config.yaml", dump_config(cfg))
    if pool.needs_fit:  # deterministic: a resumed job refits to the same weights (its books are restored)
        fit_pool(cfg, pool, train_set, device)
    if state is not None:
        job.source.load_state_dict(state["source"])
        job.selections = {int(k): v.long() for k, v in state["selections"].items()}
        job.teacher_error = state["teacher_error"]
    else:
        if setup:
            job.source.charge("setup: pool weighting on the labelled subset", setup, pool.cost.total_seconds)
        if need_error:
            targets = train_set.targets[labelled]
            probs = job.source.query(gather(train_set, labelled, device), labelled,
                                     "calibration: teacher error on the labelled set", targets.to(device),
                                     cfg.trainer.eval_batch_size)
            job.teacher_error = 1.0 - float((probs.argmax(1) == targets).float().mean())
    job.save()
    return job


def select_round(job: ActiveJob, step: DistillStep, r: int) -> None:
    """Round r's queries: the student scores the unqueried pool, the strategy picks this round's
    share of the budget, and exactly those images go to the teachers (saved at once)."""
    batch = job.cfg.trainer.eval_batch_size
    cand = job.pool_idx[~torch.isin(job.pool_idx, job.source.queried)]
    probs = student_probs(step.student, job.train, cand, batch, job.device)
    gen = torch.Generator().manual_seed(seed_for(job.cfg.seed, _SELECT_STREAM + r))
    sel = cand[job.strategy.select(probs, min(job.plan[r - 1], len(cand)), gen, job.teacher_error)]
    job.source.query(gather(job.train, sel, job.device), sel, f"round {r}", None, batch)
    job.selections[r] = sel
    job.save()


def train_round(job: ActiveJob, step: DistillStep, r: int, members: torch.Tensor) -> list[dict[str, Any]]:
    """An ordinary Trainer run on L ∪ (queried so far) in `rounds/round<r>/`; its epoch records."""
    cfg, aug = job.cfg, job.cfg.data.augment
    spent = QueryCost(dict(job.source.cost.queries), dict(job.source.cost.seconds))
    train_set = round_set(job.train, members, len(job.labelled), job.opts.round_images)
    views = as_loaded if isinstance(train_set, ImageFiles) else RandomCrops(aug.scale, aug.ratio, aug.flip)
    labeler = ActiveLabeler(views, job.source, members, len(job.labelled), spent)
    trainer = Trainer(cfg.model_copy(update={"name": f"{cfg.name}.round{r}"}), step,
                      create_backend(cfg, step, job.device), train_set, job.test, labeler,
                      cfg.run_dir / "rounds" / f"round{r}")
    return trainer.fit()


def run_active(cfg: RunConfig, data: tuple[ImageSet, ImageSet] | None = None,
               opts: ActiveConfig | None = None) -> RunResult:
    """The whole job: prepare, then rounds of (select → query → train), then the budget report."""
    opts = opts or labeling_for(cfg).options
    job = prepare_job(cfg, opts, data)
    step = create_step(cfg, job.train)
    history: list[dict[str, Any]] = []
    results: dict[int, dict[str, Any]] = {}
    for r in range(opts.rounds + 1):
        if r > 0 and r not in job.selections:
            select_round(job, step, r)
        members = torch.cat([job.labelled] + [job.selections[k] for k in range(1, r + 1)])
        if len(members) == 0:
            continue
        if r > 0 and not opts.warm_start:
            step = create_step(cfg, job.train)
        for rec in train_round(job, step, r, members):
            history.append({**rec, "round": r, "round_epoch": rec["epoch"], "epoch": len(history) + 1})
        results[r] = {"train_images": len(members), "test_top1": history[-1]["test_top1"]}

    save_model(cfg.run_dir / "student.safetensors", step.student, {"config_hash": cfg.hash()})
    write_text(cfg.run_dir / "metrics.jsonl", "".join(json.dumps(rec) + "\n" for rec in history))
    final = {**history[-1], "teacher_queries_by_teacher": dict(job.source.cost.queries),
             "teacher_seconds_by_teacher": dict(job.source.cost.seconds), "pool": job.pool.report(),
             "active": _budget_report(job, results)}
    labeling = ActiveLabels(opts)
    write_run_report(cfg.run_dir, cfg, history, final, labeling.describe(cfg), labeling.report(final))
    return RunResult(cfg, cfg.run_dir, history, final)


def _budget_report(job: ActiveJob, results: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """How the budget was spent, entry by entry (setup, calibration, rounds), with each round's
    student accuracy; `teacher_top1_selected` compares the teachers' labels on a round's images
    with their true labels — a diagnostic only, never used by the job."""
    a, source, selections, targets = job.opts, job.source, job.selections, job.train.targets
    rows, cumulative = [], 0
    by_name = {f"round {r}": r for r in selections}
    for spend in source.spends:
        cumulative += spend["queries"]
        row = {**spend, "cumulative_queries": cumulative, "budget_left": source.ledger.total - cumulative}
        r = by_name.get(spend["name"])
        if r is not None:
            probs, _ = source.lookup(selections[r])
            row.update(round=r, teacher_top1_selected=100.0 * float((probs.argmax(1) == targets[selections[r]])
                                                                    .float().mean()), **results.get(r, {}))
        rows.append(row)
    if 0 in results:  # round 0 trains after setup/calibration and before round 1's queries
        at = next((i for i, row in enumerate(rows) if row.get("round") == 1), len(rows))
        before = rows[at - 1]["cumulative_queries"] if at else 0
        rows.insert(at, {"round": 0, "name": "round 0: labelled set only", "images": 0, "queries": 0,
                         "seconds": 0.0, "cumulative_queries": before, "budget_left": source.ledger.total - before,
                         **results[0]})
    return {"strategy": a.strategy, "options": dict(a.options), "budget": a.budget, "labelled": len(job.labelled),
            "pool": len(job.pool_idx), "teachers": source.teachers, "budget_images": source.ledger.total // source.teachers,
            "budget_queries": source.ledger.total, "spent_queries": source.ledger.spent,
            "teacher_error": job.teacher_error, "rounds": rows}


def active_budget_section(active: dict[str, Any] | None) -> list[str]:
    """How an active-distillation job spent its teacher-query budget, entry by entry."""
    if not active:
        return []
    fmt = lambda row, k, f="{:.2f}": f.format(row[k]) if row.get(k) is not None else "-"  # noqa: E731
    rows = [[row["name"], row["images"], row["queries"], fmt(row, "seconds", "{:.1f}"), row["cumulative_queries"],
             row["budget_left"], row.get("train_images", "-"), fmt(row, "teacher_top1_selected"),
             fmt(row, "test_top1")] for row in active["rounds"]]
    err = active["teacher_error"]
    options = f" {active['options']}" if active["options"] else ""
    return ["## Teacher-query budget", "",
            f"- strategy `{active['strategy']}`{options}; labelled set {active['labelled']}, "
            f"pool {active['pool']} images; budget {active['budget']:.0%} = {active['budget_images']} images × "
            f"{active['teachers']} teacher(s) = {active['budget_queries']} queries; spent "
            f"**{active['spent_queries']}**; teacher error {'-' if err is None else f'{err:.3f}'}",
            "- teacher top-1 on selected: the teachers' labels against the images' true labels "
            "(diagnostic only; the job never reads pool labels)", "",
            markdown_table(["entry", "images", "queries", "teacher s", "cumulative", "left", "train images",
                            "teacher top-1 on selected", "student top-1"], rows), ""]
