"""distill: knowledge distillation and dataset distillation, one engine.

The Python API (docs/python_api.md): `distill.train`, `distill.labels`, `distill.synth`,
`distill.eval_synth`, each taking a recipe (a YAML path, a mapping or a config object) plus
overrides and returning a typed result. `import distill` stays light: the jobs (and torch, timm)
load on first use of one of them, through the module `__getattr__` below.
"""
from __future__ import annotations

__version__ = "0.1.0"
API = ("train", "labels", "synth", "eval_synth")


def __getattr__(name: str):
    if name in API:
        from distill import api  # the jobs layer, loaded on first use (heavy: torch, timm, every registry)

        return getattr(api, name)
    raise AttributeError(f"module 'distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *API])
