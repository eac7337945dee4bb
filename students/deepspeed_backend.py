"""The DeepSpeed backend: the same seam as `PlainBackend`, with the `DistillStep` wrapped by
`deepspeed.initialize` (ZeRO 0/1/2, gradient accumulation, data parallel over ranks).

The recipe decides and DeepSpeed is told (a stock config's optimizer/scheduler/bf16/fp16/clipping
sections were already taken into the recipe at load, `distill.deepspeed_config.adopt_sections`):
- the optimiser is the recipe's (`build_optimizer`, a client torch optimiser: no fused-Adam
  compile), its lr the trainer's `set_lr` (per-epoch schedule × per-step warm-up);
- `gradient_clipping` is the recipe's `trainer.grad_clip` (0: none; DeepSpeed's default is 1.0);
- `trainer.batch_size` is the global batch (DeepSpeed's `train_batch_size`), split over ranks ×
  `trainer.grad_accum` micro-steps; a config whose batch keys disagree is refused;
- `precision: bf16|fp16` becomes DeepSpeed's `torch_autocast` (fp32 weights and optimiser, low
  precision compute, as the plain backend's autocast), with gradients communicated in fp32 unless
  the config names `lower_precision_safe_modules`. DeepSpeed's native half-precision modes would
  store the student in half precision (then evaluation and the exported student would be too).
Teachers never enter the engine: the runner builds them per rank, frozen, inference only.

Checkpoints are DeepSpeed's own (`engine.save_checkpoint`, per-rank ZeRO partitions, a tag per
optimiser step under `checkpoints/deepspeed/`), committed by rank 0's atomic manifest
`checkpoints/last.safetensors` (trainer state + the tag); older tags go after the commit. They are
read back with `torch.load(weights_only=True)` and an allow-list of DeepSpeed's few record types,
so resuming never runs arbitrary pickled code. `deepspeed` is imported here, at the seam only.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from distill import distributed
from distill.artefacts import ArtefactError, load_state, read_metadata, save_state
from distill.config import OptimConfig, TrainerConfig
from distill.deepspeed_config import engine_config, read_deepspeed_config
from distill.errors import ConfigError
from students.backends import BACKENDS, build_optimizer

# ---------------------------------------------------------------- the seam


def import_deepspeed(device: torch.device | None = None):
    """DeepSpeed, imported once its environment is right: its CPU accelerator for a CPU run (or
    when no GPU is visible; no warning), a one-rank process group's variables when no launcher set
    them."""
    cpu = (device.type == "cpu") if device is not None else not torch.cuda.is_available()
    if cpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    have = os.environ.get("DS_ACCELERATOR")
    if device is not None and have is not None and (have == "cpu") != cpu:
        raise ConfigError(f"device: {device} but DS_ACCELERATOR={have} in the environment; unset it or change "
                          f"the recipe's device")
    distributed.single_process_env()
    try:
        import deepspeed  # heavy, optional: the deepspeed backend only
    except ImportError as err:
        raise ConfigError(f"trainer.backend: deepspeed, but deepspeed does not import here ({err}); "
                          f"pip install deepspeed, or use trainer.backend: plain") from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def _safe_globals() -> list:
    """The non-tensor records a ZeRO 0/1/2 DeepSpeed checkpoint holds (read with weights_only)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # optional: the deepspeed backend only
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _weights_only_load(path: str, map_location=None):
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


@BACKENDS.register("deepspeed")
class DeepSpeedBackend:
    def __init__(self, module: nn.Module, groups: list[dict], optim: OptimConfig, precision: str,
                 device: torch.device, trainer: TrainerConfig | None = None):
        if trainer is None:
            raise ConfigError("trainer.backend: deepspeed needs the recipe's trainer section (batch size, "
                              "grad_accum, deepspeed config); this caller passes none")
        deepspeed = import_deepspeed(device)
        ds = read_deepspeed_config(trainer.deepspeed)
        self.config = engine_config(ds, batch_size=trainer.batch_size, grad_accum=trainer.grad_accum,
                                    world=distributed.world_size(), precision=precision, grad_clip=trainer.grad_clip)
        self.device, self.grad_accum = device, trainer.grad_accum
        optimizer = build_optimizer(groups, optim)
        self.base_lrs = [g["lr"] for g in optimizer.param_groups]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module.to(device), optimizer=optimizer,
                                                                 config=self.config)
        self.engine.checkpoint_engine.load = _weights_only_load
        self.module = self.engine  # the trainer calls backend.module(images, targets, soft)
        self.rank = torch.distributed.get_rank()
        self.world_size = torch.distributed.get_world_size()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine's forward runs under its torch_autocast section

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # scales by 1/grad_accum; reduces gradients at the boundary

    checks_gradients = False  # ZeRO partitions them: the trainer checks the weights after each step

    def grads_finite(self) -> bool:
        """ZeRO partitions gradients across ranks: the trainer checks the loss before backward and
        the weights after each step instead (a non-finite gradient shows there)."""
        return True

    def discard(self) -> None:
        """Nothing to drop: a skipped step never ran backward (skip_step needs grad_accum 1)."""

    def step(self) -> None:
        self.engine.step()  # steps and zeroes at accumulation boundaries only

    def set_lr(self, factor: float) -> None:
        for g, base in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = base * factor

    def _all_reduce(self, value: float) -> float:
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor([float(value)], dtype=torch.float64, device=dev)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def reduce_sum(self, value: float) -> float:
        return self._all_reduce(value)

    def reduce_mean(self, value: float) -> float:
        return self._all_reduce(value) / self.world_size

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_meta(self, path: Path) -> dict[str, Any] | None:
        return read_metadata(path) if Path(path).is_file() else None

    def save_checkpoint(self, path: Path, state: dict[str, Any], metadata: dict[str, Any]) -> None:
        """Every rank writes its part under a new tag; then rank 0 commits the tag in the manifest
        and removes older tags. A kill before the commit leaves the previous checkpoint in force."""
        path = Path(path)
        root, tag = path.parent / "deepspeed", f"step{self.engine.global_steps}"
        self.engine.save_checkpoint(str(root), tag=tag, save_latest=False)
        torch.distributed.barrier()
        if self.is_main:
            save_state(path, {**state, "deepspeed": {"tag": tag, "world_size": self.world_size}},
                       {**metadata, "backend": "deepspeed"})
            for old in root.iterdir():
                if old.is_dir() and old.name != tag:
                    shutil.rmtree(old)
        torch.distributed.barrier()

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        path = Path(path)
        state, _ = load_state(path)
        ds = state.pop("deepspeed", None)
        if ds is None:
            raise ArtefactError(f"{path}: not a DeepSpeed checkpoint manifest (written by another backend)")
        loaded, _ = self.engine.load_checkpoint(str(path.parent / "deepspeed"), tag=ds["tag"],
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise ArtefactError(f"{path}: its DeepSpeed tag {ds['tag']!r} is missing under {path.parent / 'deepspeed'}")
        return state
