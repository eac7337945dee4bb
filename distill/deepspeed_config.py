"""DeepSpeed JSON configs: read, checked against the recipe, completed for `deepspeed.initialize`.

Pure dict work, so recipes validate without importing deepspeed or the students package (the
backend that uses the result is `students.deepspeed_backend`). What the recipe decides, DeepSpeed is
told, never the other way round: see that module's docstring.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill.distributed import micro_batch
from distill.errors import ConfigError

ZERO_STAGES = (0, 1, 2)
# torch optimisers DeepSpeed's ZeRO has tested (deepspeed.runtime.zero.utils.ZERO_SUPPORTED_OPTIMIZERS)
ZERO_TESTED = {"adamw"}
AUTOCAST_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


# ---------------------------------------------------------------- config: read, check, complete


def read_deepspeed_config(value: Path | dict | None) -> dict[str, Any]:
    """A JSON file, an inline mapping, or None (DeepSpeed's defaults: ZeRO stage 0)."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return json.loads(json.dumps(value))
    path = Path(value)
    if not path.is_file():
        raise ValueError(f"DeepSpeed config {str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path}: not valid JSON: {err}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"DeepSpeed config {path}: a JSON object is expected, got {type(raw).__name__}")
    return raw


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and section.get("enabled", False) not in (False, "false")


def check_deepspeed_config(ds: dict[str, Any], *, batch_size: int, grad_accum: int, precision: str,
                           optimizer: str) -> None:
    """Contradictions between a DeepSpeed config and the recipe that do not depend on the number
    of ranks. ValueError naming the key, the value and what to do."""
    for key, owner in (("optimizer", "optim (name, lr, momentum, weight_decay)"),
                       ("scheduler", "optim (schedule, warmup_epochs, milestones)")):
        if key in ds:
            raise ValueError(f"has a {key!r} section; the recipe's {owner} decides that under every backend: "
                             f"remove it from the DeepSpeed config")
    for key in ("fp16", "bf16", "amp"):
        if _enabled(ds.get(key)):
            raise ValueError(f"enables {key!r}; precision comes from the recipe (precision: bf16|fp16 runs "
                             f"DeepSpeed's torch_autocast with fp32 weights, as the plain backend does): remove it "
                             f"and set precision in the recipe")
    auto = ds.get("torch_autocast")
    if _enabled(auto):
        want = AUTOCAST_DTYPES.get(precision)
        dtype = str(auto.get("dtype", "bfloat16")).removeprefix("torch.")
        same = {"bfloat16": {"bf16", "bfloat16"}, "float16": {"fp16", "float16", "half"}}
        if want is None or dtype not in same[want]:
            raise ValueError(f"torch_autocast dtype {auto.get('dtype', 'bfloat16')!r} contradicts the recipe's "
                             f"precision {precision!r}: set precision in the recipe only")
    if ds.get("gradient_clipping", 0) not in (0, 0.0):
        raise ValueError(f"gradient_clipping {ds['gradient_clipping']!r}: the recipe does not clip gradients (nor does "
                         f"the plain backend), so the same recipe would train differently; remove it (DeepSpeed's "
                         f"own default, 1.0, is turned off for the same reason)")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"zero_optimization must be an object like {{\"stage\": 2}}, got {zero!r}")
    stage = zero.get("stage", 0)
    if stage not in ZERO_STAGES:
        why = (" (ZeRO 3 partitions the student's weights; this trainer evaluates and exports full weights on "
               "every rank)" if stage == 3 else "")
        raise ValueError(f"zero_optimization.stage {stage!r} is not supported{why}; allowed: 0, 1, 2")
    if "train_batch_size" in ds and ds["train_batch_size"] != batch_size:
        raise ValueError(f"train_batch_size {ds['train_batch_size']} contradicts trainer.batch_size {batch_size} "
                         f"(the global batch); remove the key, the recipe sets it")
    if "gradient_accumulation_steps" in ds and ds["gradient_accumulation_steps"] != grad_accum:
        raise ValueError(f"gradient_accumulation_steps {ds['gradient_accumulation_steps']} contradicts "
                         f"trainer.grad_accum {grad_accum}; remove the key, the recipe sets it")
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro is not None and (not isinstance(micro, int) or micro < 1 or batch_size % (micro * grad_accum)):
        raise ValueError(f"train_micro_batch_size_per_gpu {micro!r} × trainer.grad_accum {grad_accum} does not "
                         f"divide trainer.batch_size {batch_size}; remove the key, the recipe sets it per rank count")
    if stage >= 1 and optimizer not in ZERO_TESTED and not ds.get("zero_allow_untested_optimizer", False):
        raise ValueError(f"ZeRO stage {stage} with optim.name {optimizer!r}: DeepSpeed has not tested this optimiser "
                         f"under ZeRO; add \"zero_allow_untested_optimizer\": true to the DeepSpeed config (its "
                         f"update is elementwise, so partitioning does not change it), or use optim.name: adamw")


def engine_config(ds: dict[str, Any], *, batch_size: int, grad_accum: int, world: int,
                  precision: str) -> dict[str, Any]:
    """The dict handed to `deepspeed.initialize`: the user's config completed with what the
    recipe and the number of ranks decide (batch keys, ZeRO stage 0 by default, autocast)."""
    micro = micro_batch(batch_size, world, grad_accum)
    if ds.get("train_micro_batch_size_per_gpu", micro) != micro:
        raise ConfigError(f"trainer.deepspeed: train_micro_batch_size_per_gpu {ds['train_micro_batch_size_per_gpu']} "
                          f"contradicts the recipe on {world} rank(s): trainer.batch_size {batch_size} / ({world} ranks "
                          f"× grad_accum {grad_accum}) = {micro}; remove the key, the recipe sets it")
    out = {**ds, "train_batch_size": batch_size, "train_micro_batch_size_per_gpu": micro,
           "gradient_accumulation_steps": grad_accum}
    out["zero_optimization"] = {"stage": 0, **ds.get("zero_optimization", {})}
    out["gradient_clipping"] = 0.0  # DeepSpeed clips at 1.0 by default; the recipe does not clip
    out.setdefault("steps_per_print", 1 << 30)  # the trainer reports; DeepSpeed's own lr lines are noise
    if precision in AUTOCAST_DTYPES:
        out["torch_autocast"] = {"lower_precision_safe_modules": [], **ds.get("torch_autocast", {}),
                                 "enabled": True, "dtype": AUTOCAST_DTYPES[precision]}
    return out
