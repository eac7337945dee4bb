"""The labeler seam: where a student's labels come from, one registry for every kind.

`labels:` in a recipe is a tagged union: `source` names an entry of `LABELERS`, the section's other
keys are that entry's `Options`. An entry is one class: `Options` (its section, a `Strict` model),
`check` (checks across recipe sections, run when the recipe loads), `build` (the trainer's
`BatchLabeler` from a `LabelContext`), `describe`/`summary`/`report` (its line, its final metrics
and its section in the run report). A new label source is one module holding one registered class.

Registered here: `hard` (hard labels on fresh views; the default without a pool) and `pool` (the
recipe's teacher pool queried online on fresh views; the default with one). Elsewhere: `store`
(teachers.store_labels), `label_smoothing` (teachers.smoothing), `active` (distill.active_rounds),
`relabel` (synth.relabel), `projector` (synth.hello).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from distill.config import RunConfig, Strict
from distill.data import ImageSet
from distill.registry import Registry
from distill.report import markdown_table
from teachers.source import BatchLabeler, LabelSource, OnlineLabeler, Views


@dataclass
class LabelContext:
    """What a labeler is built from. `train`: the images it serves labels for; `views`: how a loaded
    batch becomes fresh training views (the run's random crops, eval-synth's DSA); `pool`: builds the
    recipe's teacher pool (None: the recipe has none); `run`: the student recipe (None where the
    student is not a recipe's, e.g. eval-synth's)."""

    train: ImageSet
    device: torch.device
    views: Views
    pool: Callable[[], LabelSource] | None = None
    run: RunConfig | None = None


class NoOptions(Strict):
    """A labeler configured by the rest of the recipe (e.g. `pool:`), with no keys of its own."""


class Labeling:
    """A kind of label source (see the module docstring). Subclasses set `Options` and `build`."""

    Options: ClassVar[type[Strict]] = NoOptions
    registered_name: ClassVar[str] = ""  # set by register_labeler

    def __init__(self, options: Strict):
        self.options = options

    def check(self, run: RunConfig) -> None:
        """Refuse (ValueError naming the keys) what this source cannot serve in `run`."""

    def build(self, ctx: LabelContext) -> BatchLabeler:
        raise NotImplementedError

    def run_job(self, run: RunConfig, data: tuple[ImageSet, ImageSet] | None = None) -> Any:
        """A source that trains in a job of its own (active rounds) runs it here and returns its
        result; None: `distill train`'s one trainer serves it with `build`."""
        return None

    def describe(self, run: RunConfig) -> str:
        """One line for the run report: what the labels are."""
        return self.name

    def summary(self, labeler: BatchLabeler) -> dict[str, Any]:
        """What the run's final metrics record about the labels (beside the query counts)."""
        return {}

    def report(self, summary: dict[str, Any]) -> list[str]:
        """Markdown lines of this source's section in the run report (from `summary`)."""
        return []

    @property
    def name(self) -> str:
        return type(self).registered_name


LABELERS: Registry[type[Labeling]] = Registry("label source")


def register_labeler(name: str) -> Callable[[type[Labeling]], type[Labeling]]:
    """`@register_labeler("name")` on a `Labeling` subclass: the entry `labels: {source: name}` selects."""

    def add(cls: type[Labeling]) -> type[Labeling]:
        cls.registered_name = name
        return LABELERS.register(name)(cls)

    return add


def labeler_name(run: RunConfig) -> str:
    """The recipe's label source: `labels.source`, else `pool` with a teacher pool, else `hard`."""
    if run.labels is not None:
        return run.labels.source
    return "pool" if run.pool is not None else "hard"


def create_labeling(name: str, options: Strict | dict[str, Any] | None = None) -> Labeling:
    """The registered entry `name` with its options (validated here when given as a mapping)."""
    cls = LABELERS.get(name)
    opts = options if isinstance(options, cls.Options) else cls.Options.model_validate(options or {})
    return cls(opts)


def labeling_for(run: RunConfig) -> Labeling:
    return create_labeling(labeler_name(run), run.labels.options if run.labels is not None else None)


# ---------------------------------------------------------------- the two online entries


@register_labeler("hard")
class HardLabels(Labeling):
    """Hard labels on fresh views: supervised training, i.e. distillation with no teacher."""

    def build(self, ctx: LabelContext) -> BatchLabeler:
        return OnlineLabeler(ctx.views, None)

    def describe(self, run: RunConfig) -> str:
        return "hard labels"


@register_labeler("pool")
class PoolLabels(Labeling):
    """The recipe's teacher pool (`pool:`; MEAL V2 mean, or a weighting), asked on every fresh view."""

    def check(self, run: RunConfig) -> None:
        if run.pool is None:
            raise ValueError("labels.source 'pool' queries a teacher pool: set pool.teachers")

    def build(self, ctx: LabelContext) -> BatchLabeler:
        return OnlineLabeler(ctx.views, ctx.pool())

    def describe(self, run: RunConfig) -> str:
        return (f"{len(run.pool.teachers)} teacher(s): {', '.join(t.display_name for t in run.pool.teachers)}; "
                f"loss {run.loss.kd}, discriminator {run.loss.discriminator}")

    def summary(self, labeler: BatchLabeler) -> dict[str, Any]:
        return {"pool": labeler.source.report()}

    def report(self, summary: dict[str, Any]) -> list[str]:
        return pool_weights_section(summary.get("pool"))


def pool_weights_section(pool: dict[str, Any] | None) -> list[str]:
    """The pool's weighting: each teacher's weight (and task-similarity score where fitted)."""
    if not pool:
        return []
    scores = pool.get("scores", {})
    rows = [[name, "-" if w is None else f"{w:.4f}", f"{scores[name]:.4f}" if name in scores else "-",
             "yes" if name in pool["heads"] else "no"] for name, w in pool["weights"].items()]
    how = {"confidence": f"mean per-sample weight over the {pool.get('served_rows')} labels served by this "
                         "process"}.get(pool["weighting"], "weight")
    extra = f"; score: {pool['score']}" if "score" in pool else ""
    extra += f"; τ = {pool['temperature']}" if "temperature" in pool else ""
    return ["## Teacher weights", "", f"- weighting `{pool['weighting']}` ({how}){extra}", "",
            markdown_table(["teacher", "weight", "score", "target head"], rows), ""]
