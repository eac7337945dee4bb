"""Training backends behind one seam: `prepare` (in __init__), `autocast`, `backward`, `step`,
`set_lr`, `reduce_mean`/`reduce_sum`, `rank`/`world_size`, `checkpoint_meta`/`save_checkpoint`/
`load_checkpoint`. The trainer loop never asks which backend it has.

`plain`: PyTorch on CPU or one GPU, fp32/bf16/fp16 (fp16 with a GradScaler). The DeepSpeed
backend registers itself in `BACKENDS` beside it.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
import torch.nn as nn

from distill.artefacts import load_state, read_metadata, save_state
from distill.config import OptimConfig, TrainerConfig
from distill.registry import Registry

BACKENDS: Registry[Callable[..., "PlainBackend"]] = Registry("trainer backend")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_optimizer(groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=False)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: OptimConfig, epoch: int, epochs: int) -> float:
    """Per-epoch schedule (stateless, so a resumed run recomputes it): linear warmup, then
    constant / step at `milestones` / cosine to 0 over the remaining epochs."""
    if epoch < cfg.warmup_epochs:
        return (epoch + 1) / (cfg.warmup_epochs + 1)
    if cfg.schedule == "step":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    if cfg.schedule == "cosine":
        t = (epoch - cfg.warmup_epochs) / max(1, epochs - cfg.warmup_epochs)
        return 0.5 * (1 + math.cos(math.pi * t))
    return 1.0


def warmup_factor(cfg: OptimConfig, step: int) -> float:
    """The lr multiplier of optimiser step `step` (0-based) under `warmup_steps` = N, as DeepSpeed's
    WarmupLR with warmup_min_lr 0 runs it: step 0 at 0, step k at γ(k − 1) with γ(i) = log(i + 1) /
    log(N) (`log`) or i / N (`linear`) while i < N, then 1."""
    n = cfg.warmup_steps
    if n == 0 or step > n:
        return 1.0
    if step == 0:
        return 0.0
    i = step - 1
    return math.log(i + 1) / math.log(n) if cfg.warmup_type == "log" and n > 1 else i / n


@BACKENDS.register("plain")
class PlainBackend:
    rank, world_size = 0, 1
    checks_gradients = True  # grads_finite sees every gradient: no weight check needed after a step

    def __init__(self, module: nn.Module, groups: list[dict], optim: OptimConfig, precision: str,
                 device: torch.device, trainer: TrainerConfig | None = None):
        self.device, self.dtype = device, DTYPES[precision]
        self.grad_accum, self._micro = trainer.grad_accum if trainer is not None else 1, 0
        self.grad_clip = trainer.grad_clip if trainer is not None else 0.0
        self.module = module.to(device)
        self.optimizer = build_optimizer(groups, optim)
        for g in self.optimizer.param_groups:
            g["base_lr"] = g["lr"]
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    @property
    def is_main(self) -> bool:
        return True

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.grad_accum).backward()  # the mean over the accumulation window

    def grads_finite(self) -> bool:
        """At the last micro-step of a window: are the accumulated gradients finite? (fp16: the
        GradScaler skips overflowing steps itself, so they count as finite.)"""
        if (self._micro + 1) % self.grad_accum or self.scaler.is_enabled():
            return True
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        return not grads or bool(torch.isfinite(torch.stack(torch._foreach_norm(grads))).all())  # one sync

    def discard(self) -> None:
        """Drop this window's gradients without stepping (on_nonfinite: skip_step)."""
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self._micro += 1
        if self._micro % self.grad_accum:
            return  # accumulate until the window is full
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def set_lr(self, factor: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor

    def reduce_mean(self, value: float) -> float:
        return value

    def reduce_sum(self, value: float) -> float:
        return value

    def checkpoint_meta(self, path) -> dict[str, Any] | None:
        return read_metadata(path) if path.is_file() else None

    def save_checkpoint(self, path, state: dict[str, Any], metadata: dict[str, Any]) -> None:
        """The trainer's `state` and this backend's in one atomic safetensors file."""
        save_state(path, {**state, "backend": self.state_dict()}, metadata)

    def load_checkpoint(self, path) -> dict[str, Any]:
        state, _ = load_state(path)
        self.load_state_dict(state.pop("backend"))
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        configured = [g["base_lr"] for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for g, base_lr in zip(self.optimizer.param_groups, configured):
            g["base_lr"] = base_lr  # the recipe's lr, not the checkpoint's: a resume may change optim.lr
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
