"""The synthesis-method seam: `SYNTH_METHODS` (name → class) and the one small interface.

A method is one module holding one registered class with
- `Options`: a `Strict` model of its recipe `options` (validated when the recipe loads);
- `needs_teachers`: whether it needs trained teachers (checked before compute);
- `__init__(opts, ctx)`: build what it needs from the `SynthContext` (real data, teachers, stats);
- `loss(x, y, step, generator) -> {"loss": ..., named terms}` on synthetic images `x` in [0, 1].

Importing the `synth` package imports every method module, which registers itself here.
The loop around it (`synth.run.optimise`) is shared: it owns the pixels, the optimiser
(`opts.optim`), the schedule, clipping and FYI — with `flip: true`, `x, y` arrive as
`flip_concat(x, y)`, so a method never needs to know about flipping.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Literal, Protocol

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from distill.config import Strict
from distill.data import ImageSet
from distill.models import create_model
from distill.registry import Registry
from synth.augment import DSA, DSA_OPS, check_dsa
from synth.config import ImageOptim
from synth.init import gather, keyed_generator


class SynthMethod(Protocol):
    Options: ClassVar[type[Strict]]
    needs_teachers: ClassVar[bool]
    clip: bool  # clamp pixels to [0, 1] after every step

    def __init__(self, opts: Strict, ctx: "SynthContext") -> None: ...

    def image_optim(self) -> ImageOptim: ...

    def loss(self, x: Tensor, y: Tensor, step: int, generator: torch.Generator) -> dict[str, Tensor]: ...


SYNTH_METHODS: Registry[type[SynthMethod]] = Registry("synthesis method")


@dataclass
class SynthContext:
    """What a method may use for one chunk of classes. Real images stay uint8 on the CPU (or on
    disk, for ImageFolder data); batches are drawn from them per step."""

    real: ImageSet
    by_class: dict[int, Tensor]  # class → indices into real
    teachers: list  # teachers.teacher.Teacher, frozen, on `device`
    mean: Tensor  # [1, C, 1, 1] per-channel mean of the real training images, in [0, 1]
    std: Tensor
    device: torch.device
    ipc: int  # the recipe's images per class (DC's loop lengths depend on it)
    seed: int

    @property
    def num_classes(self) -> int:
        return self.real.num_classes

    @property
    def channels(self) -> int:
        return self.real.channels

    @property
    def image_size(self) -> int:
        return self.real.image_size

    def real_batch(self, c: int, n: int, generator: torch.Generator) -> Tensor:
        """n random real images of class c (without replacement when the class has n), [0, 1]."""
        idx = self.by_class[c]
        pick = idx[torch.randperm(len(idx), generator=generator)[:n]]
        return gather(self.real, pick).to(self.device).float().div_(255)

    def random_network(self, arch: str, generator: torch.Generator) -> nn.Module:
        """A freshly initialised network taking [0, 1] images (normalised inside with the data's
        mean/std), its initial weights drawn from `generator` so a chunk is reproducible. On a CPU
        it is channels_last (measured faster there; the values are the same)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            model = create_model(arch, self.num_classes, self.channels, self.image_size, self.real.class_names,
                                 mean=tuple(self.mean.flatten().tolist()), std=tuple(self.std.flatten().tolist()))
        if self.device.type == "cpu":
            model = model.to(memory_format=torch.channels_last)
        return model.to(self.device)


def data_stats(real: ImageSet, seed: int, max_images: int = 4096) -> tuple[Tensor, Tensor]:
    """Per-channel mean/std of the real training images in [0, 1]: the normalised pixel space that
    synthesis optimises in and DSA augments in. In-memory data: all images; lazy ImageFolder data: a
    keyed sample of `max_images`."""
    if hasattr(real, "images"):
        x = real.images.float().div(255)
    else:
        idx = torch.randperm(len(real), generator=keyed_generator(seed, "stats"))[:max_images]
        x = gather(real, idx).float().div(255)
    return x.mean(dim=(0, 2, 3)).view(1, -1, 1, 1), x.std(dim=(0, 2, 3)).clamp_min(1e-3).view(1, -1, 1, 1)


def embedder(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """[0, 1] images → the embedding DM matches: ConvNet's `embed`, else timm's pre-logits."""
    net = model.net
    if hasattr(net, "embed"):
        return lambda x: net.embed(model.preprocess(x))
    if hasattr(net, "forward_head"):
        return lambda x: net.forward_head(net.forward_features(model.preprocess(x)), pre_logits=True)
    raise ValueError(f"{model.arch}: no embedding (needs `embed` or timm's `forward_head`)")


class MatchingOptions(Strict):
    """What the matching methods (DM, DC/DSA) share: differentiable siamese augmentation, and how
    many images one forward pass takes. `dsa: false` on gradient matching is plain DC; for digits
    drop "flip" from `dsa_ops`. `dsa_mode: flip_then_one` is FYI's DSA draw (see synth.augment)."""

    dsa: bool = True
    dsa_ops: list[str] = list(DSA_OPS)
    dsa_mode: Literal["single", "flip_then_one"] = "single"
    # images per forward pass: None is 32 on a CPU (cache-sized passes ran 1.5-2.5x faster than
    # 256-image ones), whole batches on a GPU; networks with BatchNorm always take whole batches
    micro_batch: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _ops(self) -> "MatchingOptions":
        check_dsa(self.dsa_ops, self.dsa_mode)
        return self


def make_dsa(opts: MatchingOptions, ctx: SynthContext) -> DSA | None:
    """The method's DSA, in the data's normalised space; None with `dsa: false`."""
    return DSA(mean=ctx.mean, std=ctx.std, ops=opts.dsa_ops, mode=opts.dsa_mode) if opts.dsa else None


CPU_IMAGES_PER_PASS = 32  # ConvNet-3 at 28 px: activations of 32 images stay in cache


def images_per_pass(opts: MatchingOptions, net: nn.Module, device: torch.device) -> int | None:
    """`micro_batch` for the matching objectives: None (whole batches) for a network with
    BatchNorm, whose output depends on the batch; else the option, by default 32 on a CPU."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
        return None
    return opts.micro_batch or (CPU_IMAGES_PER_PASS if device.type == "cpu" else None)


def class_groups(x: Tensor, y: Tensor) -> tuple[list[int], list[Tensor]]:
    """Classes present in y (sorted) and x's rows of each."""
    classes = torch.unique(y).tolist()
    return classes, [x[y == c] for c in classes]


class NoOptions(Strict):
    pass


@SYNTH_METHODS.register("none")
class NoSynthesis:
    """No optimisation: the starting images (`init`) are the distilled images, as RDED's and
    HeLlO's selected real patches are (`synth.run` skips the loop; `iterations` is unused)."""

    Options: ClassVar[type[Strict]] = NoOptions
    needs_teachers: ClassVar[bool] = False
    clip = False

    def __init__(self, opts: NoOptions, ctx: SynthContext):
        pass

    def image_optim(self) -> ImageOptim:
        return ImageOptim()

    def loss(self, x: Tensor, y: Tensor, step: int, generator: torch.Generator) -> dict[str, Tensor]:
        raise RuntimeError("method none has no objective; synth.run does not optimise its images")
