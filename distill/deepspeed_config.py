"""DeepSpeed JSON configs: read, adopted into the recipe, checked, completed for `deepspeed.initialize`.

Pure dict work, so recipes validate without importing deepspeed or the students package (the
backend that uses the result is `students.deepspeed_backend`).

A stock `ds_config.json` works as its users write it (`adopt_sections`): its `optimizer`
(AdamW/Adam/SGD), `scheduler` (WarmupLR), `bf16`/`fp16` and `gradient_clipping` sections become the
recipe's `optim`, `precision` and `trainer.grad_clip` where the recipe leaves those unset, and the
run's config records which (`trainer.from_deepspeed`); a section that contradicts what the recipe
sets, or that the trainer cannot honour, is refused naming its key. The sections then leave the
DeepSpeed config: the trainer applies them the same way under every backend (a client torch
optimiser, the per-step lr schedule, autocast with fp32 weights, clipping).
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
OPTIMIZER_TYPES = {"adamw": "adamw", "adam": "adamw", "sgd": "sgd"}  # DeepSpeed's Adam is AdamW unless adam_w_mode false
TORCH_ADAMW = {"betas": [0.9, 0.999], "eps": 1e-8}  # what a client torch.optim.AdamW uses (no recipe keys)


def _enabled(section: Any) -> bool:
    return isinstance(section, dict) and section.get("enabled", False) not in (False, "false")


class _Adopt:
    """Fills recipe keys from DeepSpeed keys, refusing a key whose value differs from what the
    recipe sets. `taken` maps each recipe key filled to the DeepSpeed key it came from."""

    def __init__(self, raw: dict[str, Any]):
        self.raw, self.taken = raw, {}

    def __call__(self, recipe_key: str, value: Any, ds_key: str) -> None:
        *parents, leaf = recipe_key.split(".")
        node = self.raw
        for p in parents:
            node = node.setdefault(p, {})
        if leaf in node and node[leaf] != value:
            raise ValueError(f"{ds_key} {value!r} contradicts the recipe's {recipe_key} {node[leaf]!r}: remove one "
                             f"of them")
        if leaf not in node:
            node[leaf] = value
            self.taken[recipe_key] = ds_key


def adopt_sections(raw: dict[str, Any]) -> dict[str, Any]:
    """A recipe mapping whose `trainer.deepspeed` holds a stock config → the same recipe with those
    sections moved into `optim`, `precision`, `trainer.grad_clip` (see the module docstring)."""
    trainer = raw.get("trainer")
    if not isinstance(trainer, dict) or trainer.get("deepspeed") is None:
        return raw
    raw = json.loads(json.dumps(raw, default=str))
    ds = read_deepspeed_config(raw["trainer"]["deepspeed"])
    take = _Adopt(raw)
    opt = ds.pop("optimizer", None)
    if opt is not None:
        kind = str(opt.get("type", "")).lower()
        params = dict(opt.get("params", {}))
        if kind not in OPTIMIZER_TYPES or (kind == "adam" and params.pop("adam_w_mode", True) is False):
            raise ValueError(f"optimizer.type {opt.get('type')!r}: the trainer runs AdamW (types AdamW, Adam with "
                             f"adam_w_mode) or SGD; set optim in the recipe instead")
        take("optim.name", OPTIMIZER_TYPES[kind], "optimizer.type")
        params.pop("torch_adam", None)
        for key, recipe_key in (("lr", "optim.lr"), ("weight_decay", "optim.weight_decay"), ("momentum", "optim.momentum")):
            if key in params:
                take(recipe_key, params.pop(key), f"optimizer.params.{key}")
        for key, default in TORCH_ADAMW.items():
            if key in params and params.pop(key) != default:
                raise ValueError(f"optimizer.params.{key}: the trainer's AdamW uses torch's {default}; remove the key")
        if params:
            raise ValueError(f"optimizer.params {sorted(params)}: not used by the trainer's optimiser; remove them")
    sched = ds.pop("scheduler", None)
    if sched is not None:
        params = dict(sched.get("params", {}))
        if sched.get("type") != "WarmupLR":
            raise ValueError(f"scheduler.type {sched.get('type')!r}: the trainer adopts WarmupLR (warm-up then a "
                             f"constant lr); write other schedules in the recipe (optim.schedule, optim.warmup_steps)")
        if params.pop("warmup_min_lr", 0) != 0:
            raise ValueError("scheduler.params.warmup_min_lr: the recipe's warm-up starts at lr 0; set it to 0")
        take("optim.schedule", "constant", "scheduler.type WarmupLR")
        if "warmup_max_lr" in params:
            take("optim.lr", params.pop("warmup_max_lr"), "scheduler.params.warmup_max_lr")
        take("optim.warmup_steps", params.pop("warmup_num_steps", 1000), "scheduler.params.warmup_num_steps")
        take("optim.warmup_type", params.pop("warmup_type", "log"), "scheduler.params.warmup_type")
        params.pop("last_batch_iteration", None)
        if params:
            raise ValueError(f"scheduler.params {sorted(params)}: not part of WarmupLR; remove them")
    halves = [k for k in ("bf16", "fp16") if _enabled(ds.get(k))]
    if len(halves) > 1:
        raise ValueError("enables both 'bf16' and 'fp16'; keep one")
    for key in ("bf16", "fp16"):
        section = ds.pop(key, None)
        if key in halves and section.get("enabled") != "auto":
            take("precision", key, f"{key}.enabled")
    if "gradient_clipping" in ds:
        take("trainer.grad_clip", float(ds.pop("gradient_clipping")), "gradient_clipping")
    raw["trainer"]["deepspeed"] = ds
    if take.taken:
        raw["trainer"]["from_deepspeed"] = {**raw["trainer"].get("from_deepspeed", {}), **take.taken}
    return raw


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


def check_deepspeed_config(ds: dict[str, Any], *, batch_size: int, grad_accum: int, precision: str,
                           optimizer: str) -> None:
    """Contradictions between a DeepSpeed config (its adoptable sections already taken by
    `adopt_sections`) and the recipe that do not depend on the number of ranks. ValueError naming
    the key, the value and what to do."""
    if _enabled(ds.get("amp")):
        raise ValueError("enables 'amp' (NVIDIA apex); precision comes from the recipe (precision: bf16|fp16 runs "
                         "autocast with fp32 weights under every backend): remove it and set precision")
    auto = ds.get("torch_autocast")
    if _enabled(auto):
        want = AUTOCAST_DTYPES.get(precision)
        dtype = str(auto.get("dtype", "bfloat16")).removeprefix("torch.")
        same = {"bfloat16": {"bf16", "bfloat16"}, "float16": {"fp16", "float16", "half"}}
        if want is None or dtype not in same[want]:
            raise ValueError(f"torch_autocast dtype {auto.get('dtype', 'bfloat16')!r} contradicts the recipe's "
                             f"precision {precision!r}: set precision in the recipe only")
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
                  precision: str, grad_clip: float = 0.0) -> dict[str, Any]:
    """The dict handed to `deepspeed.initialize`: the user's config completed with what the
    recipe and the number of ranks decide (batch keys, ZeRO stage 0 by default, autocast, clipping)."""
    micro = micro_batch(batch_size, world, grad_accum)
    if ds.get("train_micro_batch_size_per_gpu", micro) != micro:
        raise ConfigError(f"trainer.deepspeed: train_micro_batch_size_per_gpu {ds['train_micro_batch_size_per_gpu']} "
                          f"contradicts the recipe on {world} rank(s): trainer.batch_size {batch_size} / ({world} ranks "
                          f"× grad_accum {grad_accum}) = {micro}; remove the key, the recipe sets it")
    out = {**ds, "train_batch_size": batch_size, "train_micro_batch_size_per_gpu": micro,
           "gradient_accumulation_steps": grad_accum}
    out["zero_optimization"] = {"stage": 0, **ds.get("zero_optimization", {})}
    out["gradient_clipping"] = grad_clip  # the recipe's (DeepSpeed's own default would be 1.0)
    out.setdefault("steps_per_print", 1 << 30)  # the trainer reports; DeepSpeed's own lr lines are noise
    if precision in AUTOCAST_DTYPES:
        out["torch_autocast"] = {"lower_precision_safe_modules": [], **ds.get("torch_autocast", {}),
                                 "enabled": True, "dtype": AUTOCAST_DTYPES[precision]}
    return out
