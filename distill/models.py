"""Classifiers: one `create_model` for every architecture, and the checkpoint format.

Names resolve in the engine's own registry first (the field's ConvNet-3, `convnet3`, registered
here), then in timm. A model is wrapped in `ImageClassifier`, which carries its preprocessing (input size,
channels, mean/std) so models with different preprocessing share one batch of [0, 1] images
(timm's `task/distillation.py` does the same for teachers).
"""
from __future__ import annotations

import difflib
import logging
import pickle
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from distill.artefacts import ArtefactError, load_tensors, read_metadata, save_tensors
from distill.convnet import ConvNet
from distill.registry import Registry

# name → builder(num_classes, in_chans, image_size, drop_rate) -> nn.Module
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")
CHECKPOINT_FORMAT = "distill.model/1"


@MODELS.register("convnet3")
def convnet3(num_classes: int, in_chans: int, image_size: int, drop_rate: float = 0.0) -> ConvNet:
    """The field's evaluation student: ConvNet-3, width 128, instance norm (`model: convnet3`)."""
    return ConvNet(in_chans, num_classes, image_size)


def is_known_model(name: str) -> bool:
    if name in MODELS:
        return True
    import timm  # heavy (imports torchvision): loaded when a model is named

    return timm.is_model(name)


def suggest_models(name: str) -> str:
    import timm  # heavy (imports torchvision): loaded when a model is named

    close = difflib.get_close_matches(name, MODELS.names() + timm.list_models(), n=4, cutoff=0.6)
    own = ", ".join(MODELS.names())
    return f"one of the engine's ({own})" + (f"; did you mean {', '.join(close)}?" if close else "")


def build_network(name: str, num_classes: int, in_chans: int, image_size: int, drop_rate: float = 0.0,
                  weights: dict[str, torch.Tensor] | None = None, pretrained: bool = False) -> nn.Module:
    """An engine architecture, or a timm model. `weights` (a state dict) or `pretrained` (timm's hub
    weights; needs the network) load through timm's own pretrained path: its key filter, input-channel
    adaptation, and a classifier reset when the class count differs from the weights'."""
    if name in MODELS:
        return MODELS.get(name)(num_classes=num_classes, in_chans=in_chans, image_size=image_size, drop_rate=drop_rate)
    import timm  # heavy (imports torchvision): loaded when a model is named

    kwargs: dict[str, Any] = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
    if weights is not None:
        kwargs |= dict(pretrained=True, pretrained_cfg_overlay=dict(state_dict=weights,
                                                                    num_classes=_head_size(name, weights)))
    elif pretrained:
        kwargs["pretrained"] = True
    with _TimmLoadReport(_heads(name)) as report:
        try:  # ViT-style models fix their position embeddings to img_size at construction
            net = timm.create_model(name, img_size=image_size, **kwargs)
        except TypeError:  # the architecture takes any input size
            net = timm.create_model(name, **kwargs)
    if report.problems:  # timm loads non-strictly once it resets a head: anything else missing is a misfit
        raise RuntimeError("; ".join(report.problems))
    return net


class _TimmLoadReport(logging.Handler):
    """timm's own account of a pretrained load (missing keys besides the reset head, unexpected
    keys), read from its log while it builds a model."""

    def __init__(self, heads: list[str]):
        super().__init__(logging.INFO)
        self.problems: list[str] = []
        self.heads = set(heads)  # the classifier timm resets for another class count: missing by design
        self.logger = logging.getLogger("timm.models._builder")

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Missing keys") or message.startswith("Unexpected keys"):
            keys = message.split("(", 1)[1].split(")", 1)[0].split(", ")
            heads = {"weight", "bias"}
            real = [k for k in keys if not (message.startswith("Missing") and k.rsplit(".", 1)[-1] in heads
                                            and k.rsplit(".", 1)[0] in self.heads)]
            if real:
                self.problems.append(f"{message.split(' (', 1)[0].lower()} {real[:5]}")

    def __enter__(self) -> "_TimmLoadReport":
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self.level)


def _heads(name: str) -> list[str]:
    """The classifier module(s) of a timm architecture (its pretrained_cfg's `classifier`)."""
    import timm  # heavy (imports torchvision): loaded when a model is named

    cfg = timm.models.get_pretrained_cfg(name)
    heads = cfg.classifier if cfg is not None else None
    return [heads] if isinstance(heads, str) else list(heads or [])


def _head_size(name: str, weights: dict[str, torch.Tensor]) -> int:
    """Classes of the weights' classifier (timm resets the head when the model's count differs)."""
    import timm  # heavy (imports torchvision): loaded when a model is named

    for head in _heads(name):
        if f"{head}.weight" in weights:
            return int(weights[f"{head}.weight"].shape[0])
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.num_classes if cfg is not None else 1000


def timm_preprocessing(name: str) -> dict[str, Any]:
    """A timm architecture's `pretrained_cfg` preprocessing (mean, std, input size, crop_pct,
    interpolation); empty for engine architectures or names timm has no config for."""
    if name in MODELS:
        return {}
    import timm  # heavy (imports torchvision): loaded when a model is named

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return {}
    return {k: getattr(cfg, k) for k in ("mean", "std", "input_size", "crop_pct", "interpolation")}


class ImageClassifier(nn.Module):
    """A network plus its preprocessing: [0, 1] images at any size/channels → logits."""

    def __init__(self, net: nn.Module, arch: str, num_classes: int, in_chans: int, input_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...], class_names: tuple[str, ...]):
        super().__init__()
        self.net = net
        self.arch, self.num_classes, self.in_chans, self.input_size = arch, num_classes, in_chans, input_size
        self.class_names = tuple(class_names)
        self.register_buffer("mean", torch.tensor(_per_channel(mean, in_chans)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_per_channel(std, in_chans)).view(1, -1, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != self.in_chans:
            if images.shape[1] == 1:
                images = images.expand(-1, self.in_chans, -1, -1)
            elif self.in_chans == 1:
                images = images.mean(1, keepdim=True)
            else:
                raise ValueError(f"{self.arch}: cannot map {images.shape[1]} channels to {self.in_chans}")
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear",
                                   align_corners=False, antialias=images.shape[-1] > self.input_size)
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(images))

    def metadata(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, "model": self.arch, "num_classes": self.num_classes,
            "in_chans": self.in_chans, "input_size": self.input_size,
            "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist(),
            "class_names": list(self.class_names),
        }


def _per_channel(v: tuple[float, ...], n: int) -> list[float]:
    if len(v) == n:
        return list(v)
    if len(v) == 1:
        return list(v) * n
    if n == 1:
        return [sum(v) / len(v)]
    raise ValueError(f"mean/std has {len(v)} values for {n} channels")


def create_model(arch: str, num_classes: int, in_chans: int, input_size: int, class_names: tuple[str, ...],
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 drop_rate: float = 0.0, checkpoint: str | Path | None = None, pretrained: bool = False) -> ImageClassifier:
    """Build a classifier. A checkpoint this engine wrote brings its preprocessing and must fit
    (class count, architecture). Any other checkpoint of a timm architecture (a user's timm
    weights), or `pretrained` (timm's hub weights), goes through timm's pretrained loader — a head
    for another class count is reset, as timm does — and mean/std come from the architecture's
    `pretrained_cfg` unless the recipe sets them. Other mismatches are refused naming the file."""
    meta: dict[str, Any] = read_checkpoint_header(checkpoint) if checkpoint else {}
    engine = meta.get("format") == CHECKPOINT_FORMAT
    if engine:
        if meta["model"] != arch:
            raise ArtefactError(f"{checkpoint}: holds a {meta['model']!r}, the recipe asks for {arch!r}")
        if meta["num_classes"] != num_classes:
            raise ArtefactError(f"{checkpoint}: trained for {meta['num_classes']} classes, the data has {num_classes}")
        in_chans = meta["in_chans"]
        input_size = meta["input_size"]
        mean = mean or tuple(meta["mean"])
        std = std or tuple(meta["std"])
    through_timm = arch not in MODELS and ((checkpoint and not engine) or pretrained)
    if through_timm:
        pre = timm_preprocessing(arch)
        mean, std = mean or pre.get("mean"), std or pre.get("std")
        weights = read_weights(checkpoint) if checkpoint else None
        try:
            net = build_network(arch, num_classes, in_chans, input_size, drop_rate, weights, pretrained)
        except RuntimeError as err:  # timm's strict load: keys or shapes of another architecture
            raise ArtefactError(f"{checkpoint or arch + ' (hub weights)'}: weights do not fit {arch} for {num_classes} "
                                f"classes, {in_chans} channels: {str(err).splitlines()[0]}") from None
        except OSError as err:  # hub weights where there is no network
            raise ArtefactError(f"{arch}: pretrained weights could not be downloaded ({str(err).splitlines()[0]}); "
                                f"give a local checkpoint file instead (checkpoint: PATH)") from None
        return ImageClassifier(net, arch, num_classes, in_chans, input_size, mean or (0.5,), std or (0.5,),
                               class_names)
    net = build_network(arch, num_classes, in_chans, input_size, drop_rate)
    model = ImageClassifier(net, arch, num_classes, in_chans, input_size, mean or (0.5,), std or (0.5,), class_names)
    if checkpoint:
        load_weights(model, checkpoint)
    return model


def read_checkpoint_header(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_metadata(path)
    return {}


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors (preferred) or `.pt/.pth` read with weights_only=True (no
    pickled code runs); `module.` prefixes (DataParallel) dropped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state, _ = load_tensors(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise ArtefactError(f"{path}: holds pickled Python objects besides tensors, which are not loaded (they "
                                f"could run code); save its state_dict as safetensors (safetensors.torch.save_file) "
                                f"where you trust it, and point the recipe at that file") from None
        except (RuntimeError, EOFError, OSError) as err:
            raise ArtefactError(f"{path}: not a readable PyTorch checkpoint ({str(err).splitlines()[0]})") from None
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtefactError(f"{path}: not a state dict of tensors (got {type(state).__name__})")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: ImageClassifier, path: str | Path) -> None:
    """Weights that must fit the model exactly (engine checkpoints, engine architectures)."""
    state = read_weights(path)
    own = model.net.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the model's {tuple(own[k].shape)})" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise ArtefactError(f"{path}: weights do not fit {model.arch} for {model.num_classes} classes, "
                            f"{model.in_chans} channels: {'; '.join(wrong[:3])}; train or convert weights for this "
                            f"data, or check the recipe's model and data")
    missing, unexpected = model.net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtefactError(f"{path}: weights do not fit {model.arch}: missing {missing[:5]}, unexpected {unexpected[:5]}")


def save_model(path: str | Path, model: ImageClassifier, extra: dict[str, Any] | None = None) -> None:
    save_tensors(path, model.net.state_dict(), {**model.metadata(), **(extra or {})})


def load_model(path: str | Path) -> ImageClassifier:
    """A checkpoint this engine wrote describes itself: architecture, classes, preprocessing."""
    meta = read_checkpoint_header(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ArtefactError(f"{path}: not a distill model checkpoint (format {meta.get('format')!r})")
    return create_model(meta["model"], meta["num_classes"], meta["in_chans"], meta["input_size"],
                        tuple(meta["class_names"]), checkpoint=path)
