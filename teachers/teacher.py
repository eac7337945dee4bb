"""A teacher: a frozen classifier in eval mode that returns logits for a batch.

Built from a timm name (or an engine architecture) plus a local checkpoint — the engine's own
safetensors (which carry their preprocessing) or a user's weights. Its cfg record (architecture,
input size, channels, mean/std, classes) lets one batch of [0, 1] images serve teachers with
different preprocessing.
"""
from __future__ import annotations

import contextlib

import torch

from distill.config import ModelConfig
from distill.models import ImageClassifier, create_model

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Teacher:
    """`configure` sets how it runs: autocast at the run's precision (teachers are most of a KD
    run's compute: MEAL V2's two ImageNet teachers cost ~8× the student), channels_last, compile."""

    def __init__(self, name: str, model: ImageClassifier):
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.dtype: torch.dtype | None = None  # autocast dtype; None: fp32
        self.channels_last = False

    def configure(self, precision: str = "fp32", channels_last: bool = False, compile: bool = False) -> "Teacher":
        self.dtype = AUTOCAST.get(precision)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile:
            self.model.compile()  # in place: weights and state-dict keys stay the model's
        return self

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    def to(self, device: torch.device | str) -> "Teacher":
        self.model.to(device)
        return self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with self.running(images) as x:
            return self.model(x).float()

    @contextlib.contextmanager
    def running(self, images: torch.Tensor):
        """Inference mode, autocast at the configured precision, images in the configured memory
        format: how every pass through this teacher runs (logits, features)."""
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(images.device.type, dtype=self.dtype or torch.float32,
                                                    enabled=self.dtype is not None):
            yield images

    def cfg(self) -> dict:
        return {"name": self.name, **self.model.metadata()}


def create_teacher(cfg: ModelConfig, num_classes: int, in_chans: int, input_size: int,
                   class_names: tuple[str, ...]) -> Teacher:
    """A teacher for data with `num_classes`/`in_chans` at `input_size` (the recipe's `input_size`,
    mean/std or the checkpoint's metadata take precedence)."""
    model = create_model(cfg.model, num_classes, in_chans, cfg.input_size or input_size, class_names,
                         mean=cfg.mean, std=cfg.std, checkpoint=cfg.checkpoint, pretrained=cfg.pretrained)
    return Teacher(cfg.display_name, model)
