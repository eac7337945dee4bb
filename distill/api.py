"""The Python API: every job as one call, the same recipes and checks as the CLI.

A recipe is a YAML path, a mapping, or a config object (`RunConfig`, `SynthConfig`); keyword
overrides follow the CLI's `a.b=value`, written `a__b=value` (or `**{"a.b": value}`):

    import distill
    run = distill.train("configs/demo/student_hard.yaml", trainer__epochs=3, out_dir="runs/api")
    print(run.final["test_top1"], run.run_dir)

Results are typed: `RunResult` (train), `LabelsResult` (labels), `SynthResult` (synth),
`EvalReport` (eval_synth).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from distill.config import RunConfig, apply_overrides, read_yaml
from distill.generate_store import LabelsResult, generate_labels
from distill.recipe import parse_config, parse_synth_config
from distill.runner import train as run_training
from students.build import RunResult
from synth.config import SynthConfig
from synth.eval_synth import EvalReport
from synth.eval_synth import eval_synth as run_eval_synth
from synth.run import SynthResult, synthesize

Recipe = str | Path | dict[str, Any] | BaseModel


def overrides_of(values: dict[str, Any]) -> list[str]:
    """`{"trainer__epochs": 3}` → `["trainer.epochs=3"]` (values as JSON, which YAML reads back)."""
    return [f"{key.replace('__', '.')}={json.dumps(v, default=str)}" for key, v in values.items()]


def _raw(recipe: Recipe) -> tuple[dict[str, Any], str]:
    if isinstance(recipe, BaseModel):
        return recipe.model_dump(mode="json"), type(recipe).__name__
    if isinstance(recipe, dict):
        return recipe, "recipe"
    return read_yaml(recipe), str(recipe)


def run_config(recipe: Recipe, **overrides: Any) -> RunConfig:
    raw, source = _raw(recipe)
    return parse_config(apply_overrides(raw, overrides_of(overrides)), source)


def synth_config(recipe: Recipe, **overrides: Any) -> SynthConfig:
    raw, source = _raw(recipe)
    return parse_synth_config(apply_overrides(raw, overrides_of(overrides)), source)


def train(recipe: Recipe, **overrides: Any) -> RunResult:
    """`distill train`: a student (or a teacher) from a recipe."""
    return run_training(run_config(recipe, **overrides))


def labels(recipe: Recipe, rank: int | None = None, world: int | None = None, progress: bool = True,
           **overrides: Any) -> LabelsResult:
    """`distill labels`: write (or resume) the recipe's FKD/FerKD label store."""
    return generate_labels(run_config(recipe, **overrides), rank, world, progress=progress)


def synth(recipe: Recipe, rank: int | None = None, world: int | None = None, progress: bool = True,
          **overrides: Any) -> SynthResult:
    """`distill synth`: a distilled dataset from a synthesis recipe."""
    return synthesize(synth_config(recipe, **overrides), rank, world, progress=progress)


def eval_synth(artefact: str | Path, students: list[str] | None = None, seeds: int | None = None,
               device: str = "auto", progress: bool = True, **protocol: Any) -> EvalReport:
    """`distill eval-synth`: fresh students on a distilled set, its random real subset and full data;
    keyword arguments override the protocol (the artefact recipe's `eval` section)."""
    return run_eval_synth(artefact, students, seeds, overrides=overrides_of(protocol), device=device,
                          progress=progress)
