"""Image files (ImageFolder trees, WebDataset shards): decoded in loader workers, cropped on the photo.

Training views are RandomResizedCrops sampled on the whole decoded image, as timm, torchvision and
FKD sample them, so a 0.08-area crop keeps its full resolution. A crop is a box in normalised
coordinates (fractions of width and height, rounded through fp16 as a label store keeps them)
plus a flip; `cut_views` turns the boxes into pixels of the image they belong to and resamples
each to `image_size`. Online training, label-store generation and replay all cut with it, from the
same fp16 boxes, so a replayed view has exactly the pixels the teacher was shown. A `CropPlan`
says which boxes an image gets at an epoch: fresh ones keyed by (seed, epoch, index), or a store's.
One decode yields every crop of an image (FKD's multi-crop loading).

Test images follow the evaluation protocol (`EvalTransform`): short side resized to
image_size / crop_pct, centre crop, from the model's timm `pretrained_cfg` unless the recipe says.
"""
from __future__ import annotations

import hashlib
import math
import multiprocessing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import Dataset, default_collate

from distill.augment import sample_crops
from distill.errors import DataError

JPEG_SUFFIXES = {".jpg", ".jpeg"}
IMAGE_SUFFIXES = JPEG_SUFFIXES | {".png", ".bmp", ".webp"}
DECODE_ERRORS = (OSError, ValueError, SyntaxError, RuntimeError)  # PIL's and torchvision's for broken files


def decode_image(data: bytes, channels: int, jpeg: bool) -> Tensor:
    """Encoded bytes → uint8 `[C, H, W]`. JPEG through torchvision's libjpeg-turbo decoder (faster
    than PIL here, docs/data.md); other formats, and JPEGs it refuses, through PIL."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if jpeg:
        try:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                               mode=ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB)
        except RuntimeError:
            pass  # e.g. an unusual colour space: PIL below says what is wrong, if anything
    import io

    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.reshape(arr.shape[0], arr.shape[1], channels).copy()).permute(2, 0, 1)


def box_pixels(boxes01: Tensor, h: int, w: int) -> list[tuple[int, int, int, int]]:
    """Normalised `(x1, y1, x2, y2)` → whole-pixel `(top, left, height, width)` in an `h × w` image
    (at least one pixel). Sizes up to 2048 px round back to the sampled pixels exactly."""
    b = (boxes01.double() * torch.tensor([w, h, w, h], dtype=torch.float64)).round().long().tolist()
    out = []
    for x1, y1, x2, y2 in b:
        x1, y1 = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
        out.append((y1, x1, max(1, min(y2, h) - y1), max(1, min(x2, w) - x1)))
    return out


def cut_views(image: Tensor, boxes01: Tensor, flips: Tensor, size: int) -> Tensor:
    """The crops of one decoded image: uint8 `[M, C, size, size]` (bilinear, antialiased)."""
    from torchvision.transforms.v2.functional import resized_crop

    h, w = image.shape[-2:]
    views = [resized_crop(image, t, l, hh, ww, [size, size], antialias=True)
             for t, l, hh, ww in box_pixels(boxes01, h, w)]
    return torch.stack([v.flip(-1) if f else v for v, f in zip(views, flips.tolist())])


def keyed_seed(*key: Any) -> int:
    digest = hashlib.sha256(":".join(map(str, key)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class CropPlan(Protocol):
    """The boxes `[M, 4]` (normalised, fp16-exact) and flips `[M]` an image gets at an epoch."""

    crops: int

    def __call__(self, epoch: int, index: int, h: int, w: int) -> tuple[Tensor, Tensor]: ...


@dataclass(frozen=True)
class RandomCropPlan:
    """Fresh RandomResizedCrops on the `h × w` photo, a function of (seed, epoch, index) alone, so
    every rank, worker count and resume draws the same ones."""

    seed: int
    crops: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_prob: float

    def __call__(self, epoch: int, index: int, h: int, w: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(keyed_seed("distill.crops", self.seed, epoch, index))
        boxes, flips = sample_crops(1, self.crops, (h, w), self.scale, self.ratio, self.flip_prob, gen)
        return normalise(boxes[0], h, w), flips[0]


class StoredCropPlan:
    """Recorded boxes as a plan: a label store's `boxes` `[n, M, 4]` and `flips` per shard file
    (files in image order, one list per label epoch); image i at epoch e gets the first `crops`
    of label epoch e mod E. Read in the loader's workers, boxes and flips only, one epoch at a
    time (the labeler that replays the labels checks every shard's sha256 as it loads them)."""

    def __init__(self, files_by_epoch: list[list[Path]], crops: int):
        self.files_by_epoch, self.crops = files_by_epoch, crops
        self._epoch: int | None = None
        self._boxes = self._flips = torch.empty(0)

    def __call__(self, epoch: int, index: int, h: int, w: int) -> tuple[Tensor, Tensor]:
        from safetensors import safe_open

        e = epoch % len(self.files_by_epoch)
        if e != self._epoch:
            boxes, flips = [], []
            for path in self.files_by_epoch[e]:
                with safe_open(str(path), "pt") as f:
                    boxes.append(f.get_tensor("boxes")[:, :self.crops])
                    flips.append(f.get_tensor("flips")[:, :self.crops])
            self._boxes, self._flips, self._epoch = torch.cat(boxes), torch.cat(flips), e
        return self._boxes[index].float(), self._flips[index]


def normalise(boxes: Tensor, h: int, w: int) -> Tensor:
    """Pixel boxes → fractions of the image, rounded through fp16 (what a store keeps)."""
    return (boxes.double() / torch.tensor([w, h, w, h], dtype=torch.float64)).half().float()


# ----------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalTransform:
    """Test-image preprocessing: short side → `resize`, centre crop `size`, `interpolation`."""

    size: int
    resize: int
    interpolation: str = "bilinear"
    origin: str = "default"  # where the numbers came from (the report says)

    @property
    def crop_pct(self) -> float:
        return self.size / self.resize

    def describe(self) -> str:
        return (f"resize short side to {self.resize} ({self.interpolation}), centre crop {self.size} "
                f"(crop_pct {self.crop_pct:.3f}; {self.origin})")

    def __call__(self, image: Tensor) -> Tensor:
        from torchvision.transforms.v2.functional import InterpolationMode, center_crop, resize

        mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
                "nearest": InterpolationMode.NEAREST}[self.interpolation]
        h, w = image.shape[-2:]
        s = self.resize / min(h, w)
        hw = [max(self.resize, round(h * s)), max(self.resize, round(w * s))]
        out = resize(image, hw, mode, antialias=self.interpolation != "nearest")
        return center_crop(out, [self.size, self.size])


def default_eval(size: int) -> EvalTransform:
    return EvalTransform(size, size, "bilinear", "default: crop_pct 1")


def resolve_eval(size: int, resize: int | None = None, crop_pct: float | None = None,
                 interpolation: str | None = None, models: tuple[str, ...] = ()) -> EvalTransform:
    """The recipe's `eval:` keys, the rest from the first of `models` that timm has a
    `pretrained_cfg` for (crop_pct, interpolation), else crop_pct 1 and bilinear."""
    origin = "recipe eval"
    if (resize is None and crop_pct is None) or interpolation is None:
        cfg = next(filter(None, map(_pretrained_cfg, models)), None)
        if cfg is not None:
            given = resize is not None or crop_pct is not None or interpolation is not None
            crop_pct = crop_pct if crop_pct is not None or resize is not None else cfg["crop_pct"]
            interpolation = interpolation or cfg["interpolation"]
            origin = f"{'recipe eval + ' * given}timm pretrained_cfg of {cfg['name']}"
    interpolation = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
    if resize is None:
        resize = math.floor(size / (crop_pct or 1.0))  # timm's transforms_factory rounds down
    if resize < size:
        raise DataError(f"eval.resize {resize} is below data.image_size {size}: the centre crop would not fit")
    return EvalTransform(size, resize, interpolation, origin)


def _pretrained_cfg(name: str) -> dict[str, Any] | None:
    """timm's default preprocessing for `name` (None: timm has none, e.g. convnet3)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return None
    return {"name": name, "crop_pct": float(cfg.crop_pct or 1.0), "interpolation": cfg.interpolation or "bilinear"}


# ----------------------------------------------------------------------------- datasets


class ImageFiles(Dataset):
    """Labelled encoded images, decoded lazily. `set[i]` is test image i under `eval_transform`
    (`(uint8 [C, S, S], target, i)`); training views come from `TrainViews`. A file that does not
    decode raises a DataError naming it, or (`on_bad_image="skip"`) yields None — dropped from its
    batch by `collate_skipping` — and is counted in `skipped`, shared with the loader's workers."""

    targets: Tensor
    class_names: tuple[str, ...]

    def __init__(self, image_size: int, channels: int, eval_transform: EvalTransform | None, on_bad_image: str):
        self._size, self._channels, self.on_bad_image = image_size, channels, on_bad_image
        self.eval_transform = eval_transform or default_eval(image_size)
        self._skipped = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return len(self.targets)

    def read(self, i: int) -> tuple[bytes, bool]:
        """Image i's encoded bytes and whether they are a JPEG."""
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def decoded(self, i: int) -> Tensor | None:
        """Image i as uint8 `[C, H, W]` at its own size; None when skipped as undecodable."""
        try:
            data, jpeg = self.read(i)
            return decode_image(data, self._channels, jpeg)
        except DECODE_ERRORS as err:
            if self.on_bad_image == "error":
                raise DataError(f"{self.name(i)}: cannot be decoded as an image ({err}); fix or remove the file, or "
                                f"set data.on_bad_image: skip to leave such files out (counted in the report)") from None
            with self._skipped.get_lock():
                self._skipped.value += 1
            return None

    def __getitem__(self, i: int):
        image = self.decoded(i)
        return None if image is None else (self.eval_transform(image), self.targets[i], i)

    @property
    def skipped(self) -> int:
        """Files left out so far because they did not decode (`on_bad_image: skip`)."""
        return self._skipped.value

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def image_size(self) -> int:
        return self._size

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


class ImageFolderSet(ImageFiles):
    """`root/<class>/<image>`, one folder per class, files sorted by name."""

    def __init__(self, root: Path, image_size: int, channels: int, class_names: tuple[str, ...] | None = None,
                 on_bad_image: str = "error", eval_transform: EvalTransform | None = None):
        super().__init__(image_size, channels, eval_transform, on_bad_image)
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
        if class_names is not None and tuple(classes) != tuple(class_names):
            raise DataError(f"{root}: class folders {classes} differ from the training classes {list(class_names)}")
        self.files: list[Path] = []
        targets, empty = [], []
        for c, name in enumerate(classes):
            files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            empty += [name] * (not files)
            self.files += files
            targets += [c] * len(files)
        if empty:
            raise DataError(f"{root}: class folder(s) {empty[:8]} hold no images with suffix {sorted(IMAGE_SUFFIXES)}; "
                            f"every class needs images (remove the folder, or add its images)")
        self.targets, self.class_names = torch.tensor(targets), tuple(classes)

    def read(self, i: int) -> tuple[bytes, bool]:
        return self.files[i].read_bytes(), self.files[i].suffix.lower() in JPEG_SUFFIXES

    def name(self, i: int) -> str:
        return str(self.files[i])

    def subset(self, index: Tensor) -> "ImageFolderSet":
        """The images at `index` (in that order), sharing this set's settings."""
        out = object.__new__(ImageFolderSet)
        out.__dict__.update(self.__dict__)
        out.files, out.targets = [self.files[i] for i in index.tolist()], self.targets[index]
        return out

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f, t in zip(self.files, self.targets.tolist()):
            h.update(f"{f.name}:{t}:{f.stat().st_size}\n".encode())
        h.update(f"{self._size}:{self._channels}".encode())
        return h.hexdigest()[:16]


class TrainViews(Dataset):
    """Training items of an `ImageFiles` set: key `(epoch, i)` → `(uint8 [M, C, S, S], target, i,
    boxes [M, 4], flips [M])`, the M crops `plan` gives image i at that epoch, from one decode.
    The epoch travels with the key (`EpochKeys`), so persistent workers need no message."""

    def __init__(self, files: ImageFiles, plan: CropPlan):
        self.files, self.plan = files, plan

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        image = self.files.decoded(i)
        if image is None:
            return None
        boxes, flips = self.plan(epoch, i, *image.shape[-2:])
        return cut_views(image, boxes, flips, self.files.image_size), self.files.targets[i], i, boxes, flips


class EpochKeys(torch.utils.data.Sampler):
    """Wraps an index sampler: yields `(epoch, i)`; `epoch` is set before each pass (`set_epoch`)."""

    def __init__(self, sampler: torch.utils.data.Sampler):
        self.sampler, self.epoch = sampler, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)


def collate_views(items: list, keep_boxes: bool = False) -> Any:
    """Multi-crop items → one batch of views, image-major: `[B·M, C, S, S]`, targets and indices
    repeated per view (+ boxes `[B, M, 4]` and flips `[B, M]` when `keep_boxes`). Skipped items
    (None) are dropped; None when all were."""
    kept = [x for x in items if x is not None]
    if not kept:
        return None
    views, targets, index, boxes, flips = default_collate(kept)
    M = views.shape[1]
    out = (views.flatten(0, 1), targets.repeat_interleave(M), index.repeat_interleave(M))
    return out + (boxes, flips) if keep_boxes else out


def collate_views_with_boxes(items: list) -> Any:
    return collate_views(items, keep_boxes=True)
