"""Recipes with every registry filled: the one entry point through which the CLI, the demo, the
jobs and the benchmarks load a recipe.

`distill.config` (and `synth.config`) parse a recipe's structure: types, ranges and rules between
fields that need no registry. Names that the upper packages register — label sources
(`teachers.labeling.LABELERS`), KD losses, pool weightings, selection strategies, synthesis methods
— are checked here, after every package is imported, and a `labels:` section's options are
validated into its source's `Options`. Errors name the field and what is allowed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

# importing a package registers its entries (students: backends, KD losses; teachers: label sources,
# pool weightings, strategies; synth: methods, relabel/projector label sources); the jobs layer
# registers one label source of its own, `active`
from distill import active_rounds  # noqa: F401
from distill.config import RunConfig, apply_overrides, format_validation_error, parse_run_config, read_yaml
from distill.errors import ConfigError
from distill.registry import Registry
from students.losses import KD_LOSSES
from synth.config import SynthConfig, parse_synth_structure
from synth.methods import SYNTH_METHODS
from teachers.labeling import LABELERS, create_labeling, labeler_name
from teachers.weighting import POOL_WEIGHTINGS


def _problem(source: str, field: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: invalid recipe (1 problem)\n  - {field}: {message}")


def _known(source: str, field: str, name: str, registry: Registry, what: str | None = None) -> None:
    if name not in registry:
        allowed = ", ".join(map(repr, registry.names()))
        raise _problem(source, field, f"not allowed; unknown {what or registry.kind} {name!r}; allowed: {allowed}")


def parse_config(raw: dict[str, Any], source: str = "recipe") -> RunConfig:
    """A student recipe, fully checked: its structure, then every registered name it uses, then its
    label source's options and that source's checks against the rest of the recipe."""
    cfg = parse_run_config(raw, source)
    _known(source, "loss.kd", cfg.loss.kd, KD_LOSSES)
    if cfg.pool is not None:
        _known(source, "pool.weighting", cfg.pool.weighting, POOL_WEIGHTINGS)
    name = labeler_name(cfg)
    _known(source, "labels.source", name, LABELERS)
    try:
        labeling = create_labeling(name, cfg.labels.options if cfg.labels is not None else None)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, prefix="labels",
                                                  model=LABELERS.get(name).Options)) from None
    try:
        labeling.check(cfg)
    except ValueError as err:
        raise _problem(source, "labels" if cfg.labels is not None else "(top level)", str(err)) from None
    if cfg.labels is None:
        return cfg
    return cfg.model_copy(update={"labels": cfg.labels.model_copy(update={"options": labeling.options})})


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    return parse_config(apply_overrides(read_yaml(path), list(overrides)), str(path))


def as_run_config(recipe: RunConfig | str | Path | dict[str, Any]) -> RunConfig:
    """A recipe given as a parsed config, a YAML path or a mapping (the Python API's forms)."""
    if isinstance(recipe, RunConfig):
        return recipe
    if isinstance(recipe, dict):
        return parse_config(recipe)
    return load_config(recipe)


def parse_synth_config(raw: dict[str, Any], source: str = "recipe") -> SynthConfig:
    """A synthesis recipe, fully checked: its structure, its method and the method's options."""
    cfg = parse_synth_structure(raw, source)
    _known(source, "method", cfg.method, SYNTH_METHODS, "method")
    method = SYNTH_METHODS.get(cfg.method)
    try:
        method.Options.model_validate(cfg.options)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source, prefix="options", model=method.Options)) from None
    if cfg.method == "none" and cfg.flip:
        raise _problem(source, "flip", "flip: true mirrors the images while they are optimised; method none keeps the "
                                       "starting images as they are: set flip: false, or choose an optimising method")
    if method.needs_teachers:
        if not cfg.teachers:
            raise _problem(source, "teachers", f"the images of method {cfg.method} need trained teachers: set "
                                               f"teachers (a model + its checkpoint)")
        for i, t in enumerate(cfg.teachers):
            if t.checkpoint is None:
                raise _problem(source, f"teachers.{i}", f"{t.display_name} has no checkpoint; the images of method "
                                                        f"{cfg.method} need a trained teacher (train one with "
                                                        f"`distill train`)")
    return cfg


def load_synth_config(path: str | Path, overrides: list[str] = ()) -> SynthConfig:
    return parse_synth_config(apply_overrides(read_yaml(path), list(overrides)), str(path))


def load_recipe(path: str | Path, overrides: list[str] = ()) -> BaseModel:
    """Either kind of recipe: a synthesis recipe has `ipc:`, a student recipe does not."""
    if "ipc" in read_yaml(path):
        return load_synth_config(path, overrides)
    return load_config(path, overrides)
