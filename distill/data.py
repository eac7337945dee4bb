"""Data sources, one registry (`DATA_SOURCES`, the recipe's `data.source`): the built-in digits,
`.npz` arrays, ImageFolder trees and WebDataset shards.

Every dataset yields `(uint8 image [C, S, S], target, index)` at the recipe's square `image_size`
for testing and carries its `class_names` (they travel into every artefact). In-memory sets
(digits, npz: the fast path) are resized at load and cropped per batch on float images
(`distill.augment`); image files are decoded and cropped on the whole photo in loader workers
(`distill.imagefiles`). `data.train_limit` and `data.train_subset` apply to every source.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from distill.config import DataConfig, RunConfig
from distill.errors import DataError
from distill.imagefiles import EvalTransform, ImageFiles, ImageFolderSet, resolve_eval
from distill.registry import Registry
from distill.webdataset_source import MANIFEST, load_webdataset_sets, read_manifest

# name → loader(cfg, eval transform, splits) → one dataset per split ("train", "test")
DATA_SOURCES: Registry[Callable[[DataConfig, EvalTransform | None, tuple[str, ...]], list]] = Registry("data source")


class ImageSet(Dataset):
    """In-memory images (uint8 `[N, C, S, S]`) with integer targets and class names."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, class_names: tuple[str, ...]):
        assert images.dtype == torch.uint8 and images.ndim == 4, images.shape
        self.images, self.targets, self.class_names = images, targets.long(), tuple(class_names)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.images[i], self.targets[i], i

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, index: torch.Tensor) -> "ImageSet":
        return ImageSet(self.images[index], self.targets[index], self.class_names)

    def fingerprint(self) -> str:
        """Identity of the data (images, targets, classes): artefacts derived from it carry this."""
        h = hashlib.sha256()
        h.update(self.images.numpy().tobytes())
        h.update(self.targets.numpy().tobytes())
        h.update("\x00".join(self.class_names).encode())
        return h.hexdigest()[:16]


def collate_skipping(items: list) -> Any:
    """`default_collate` without the items a dataset skipped (None); None when all were."""
    kept = [x for x in items if x is not None]
    return default_collate(kept) if kept else None


def resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False,
                        antialias=images.shape[-1] > size)
    return out.round().clamp(0, 255).to(torch.uint8)


def _as_nchw_uint8(x: np.ndarray, name: str, source: str) -> torch.Tensor:
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"{source}: {name} has shape {x.shape}; expected [N, H, W], [N, H, W, C] or [N, C, H, W] with C in 1, 3")
    if x.dtype != np.uint8:
        if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x.reshape(len(x), -1)).all(1)).flatten()
            raise DataError(f"{source}: {name} holds non-finite pixels (NaN/inf) in {len(bad)} image(s), e.g. index "
                            f"{bad[:5].tolist()}; fix or drop them")
        if np.issubdtype(x.dtype, np.floating) and x.min() >= 0 and x.max() <= 1:
            x = np.round(x * 255)
        elif x.min() < 0 or x.max() > 255:
            raise DataError(f"{source}: {name} values lie in [{x.min()}, {x.max()}]; expected uint8 or floats in [0, 1]")
        x = x.astype(np.uint8)
    return torch.from_numpy(np.ascontiguousarray(x))


def load_digits_sets(image_size: int) -> tuple[ImageSet, ImageSet]:
    """scikit-learn's 1,797 8×8 digits, a fixed stratified 80/20 split (seed 0), upscaled."""
    from sklearn.datasets import load_digits  # heavy: loaded only where a probe or digits need it
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)
    idx_train, idx_test = train_test_split(np.arange(len(x)), test_size=0.2, random_state=0, stratify=d.target)
    names = tuple(str(c) for c in d.target_names)
    return tuple(  # type: ignore[return-value]
        ImageSet(resize_uint8(torch.from_numpy(x[i])[:, None], image_size), torch.from_numpy(d.target[i]), names)
        for i in (idx_train, idx_test)
    )


def load_npz_sets(path: Path, image_size: int, splits: tuple[str, ...] = ("train", "test")) -> list[ImageSet]:
    """`x_train, y_train, x_test, y_test` (+ optional `class_names`), opened with allow_pickle=False.
    Only the images of `splits` are read (both label arrays are, to fix the class list)."""
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: not a readable .npz file ({err})") from None
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
    if missing:
        raise DataError(f"{path}: missing arrays {sorted(missing)} (has {sorted(z.files)})")
    ys = {k: np.asarray(z[f"y_{k}"]).astype(np.int64) for k in ("train", "test")}
    n = int(max(y.max() for y in ys.values())) + 1
    low = min(y.min() for y in ys.values())
    names = tuple(str(c) for c in z["class_names"]) if "class_names" in z.files else tuple(str(i) for i in range(n))
    if len(names) < n or low < 0:
        raise DataError(f"{path}: labels span [{low}, {n - 1}] but there are {len(names)} class names")
    unseen = sorted(set(np.unique(ys["test"]).tolist()) - set(np.unique(ys["train"]).tolist()))
    if unseen:
        raise DataError(f"{path}: y_test holds label(s) {unseen[:8]} that y_train never contains; a model trained here "
                        f"could not predict them (fix the labels, or add training images of those classes)")
    sets = []
    for split in splits:
        x, y = _as_nchw_uint8(np.asarray(z[f"x_{split}"]), f"x_{split}", str(path)), ys[split]
        if len(x) != len(y):
            raise DataError(f"{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
        sets.append(ImageSet(resize_uint8(x, image_size), torch.from_numpy(y), names))
    return sets


def load_imagefolder_sets(root: Path, image_size: int, channels: int, on_bad_image: str = "error",
                          eval_transform: EvalTransform | None = None,
                          splits: tuple[str, ...] = ("train", "test")) -> list[ImageFolderSet]:
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"{root}: an ImageFolder root holds train/ and val/ (or test/), each with one folder per class")
    train = ImageFolderSet(root / "train", image_size, channels, None, on_bad_image, eval_transform)
    test = ImageFolderSet(test_dir, image_size, channels, train.class_names, on_bad_image, eval_transform)
    return [train if s == "train" else test for s in splits]


def data_config_for(spec: str, image_size: int, channels: int) -> DataConfig:
    """'digits' | a .npz file | an ImageFolder root | WebDataset shards (a `distill data pack`
    folder, or tar files: `DIR/val-{000000..000009}.tar`, `a.tar::b.tar`) → a data config at the
    model's input size. Shards named directly serve either split; a pack folder's test split is its
    manifest's val split."""
    if spec == "digits":
        return DataConfig(source="digits", image_size=image_size, channels=channels)
    if spec.endswith(".tar"):
        return DataConfig(source="webdataset", urls=spec, val_urls=spec, image_size=image_size, channels=channels)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"--data {spec!r}: not 'digits' and no such file or folder")
    if (path / MANIFEST).is_file():
        train = read_manifest(path)["splits"].get("train", {}).get("shards", [])
        if not train:
            raise DataError(f"{path / MANIFEST}: no train split; name the shards instead (--data DIR/val-000000.tar)")
        return DataConfig(source="webdataset", urls="::".join(str(path / r["file"]) for r in train),
                          image_size=image_size, channels=channels)
    source = "npz" if path.suffix == ".npz" else "imagefolder"
    return DataConfig(source=source, path=path, image_size=image_size, channels=channels)


def _digits(cfg: DataConfig, eval_transform: EvalTransform | None, splits: tuple[str, ...]) -> list[ImageSet]:
    sets = dict(zip(("train", "test"), load_digits_sets(cfg.image_size)))
    return [_channels(sets[s], cfg) for s in splits]


def _npz(cfg: DataConfig, eval_transform: EvalTransform | None, splits: tuple[str, ...]) -> list[ImageSet]:
    return [_channels(s, cfg) for s in load_npz_sets(cfg.path, cfg.image_size, splits)]


def _imagefolder(cfg: DataConfig, eval_transform: EvalTransform | None, splits: tuple[str, ...]) -> list:
    return load_imagefolder_sets(cfg.path, cfg.image_size, cfg.channels or 3, cfg.on_bad_image, eval_transform, splits)


def _webdataset(cfg: DataConfig, eval_transform: EvalTransform | None, splits: tuple[str, ...]) -> list:
    return load_webdataset_sets(cfg.urls, cfg.val_urls, cfg.image_size, cfg.channels or 3, cfg.on_bad_image,
                                eval_transform, splits)


for _name, _load in (("digits", _digits), ("npz", _npz), ("imagefolder", _imagefolder), ("webdataset", _webdataset)):
    DATA_SOURCES.register(_name)(_load)


def load_data(cfg: DataConfig, eval_transform: EvalTransform | None = None) -> tuple[Any, Any]:
    """(train, test) as the recipe describes them; `eval_transform`: how image files become test
    images (None: short side to image_size, centre crop; `distill.imagefiles.resolve_eval`)."""
    train, test = DATA_SOURCES.get(cfg.source)(cfg, eval_transform, ("train", "test"))
    return limit_train(train, cfg), test


def eval_transform_for(run: RunConfig) -> EvalTransform:
    """The run's test-image protocol: its `eval:` keys, the rest from the student's (else the first
    teacher's) timm pretrained_cfg."""
    teachers = tuple(t.model for t in run.pool.teachers if hasattr(t, "model")) if run.pool else ()
    e = run.eval
    return resolve_eval(run.data.image_size, e.resize, e.crop_pct, e.interpolation, (run.student.model, *teachers))


def eval_protocol(test: Any) -> str:
    """How the test images were made, for the report."""
    if isinstance(test, ImageFiles):
        return test.eval_transform.describe()
    return f"in-memory images at {test.image_size}px, used as loaded (no resize or crop)"


def load_split(cfg: DataConfig, split: str, eval_transform: EvalTransform | None = None) -> Any:
    """One split, without decoding the other's images (`distill eval` scores one)."""
    if split not in ("train", "test"):
        raise DataError(f"split {split!r}; allowed: train, test")
    data = DATA_SOURCES.get(cfg.source)(cfg, eval_transform, (split,))[0]
    return limit_train(data, cfg) if split == "train" else data


def limit_train(train: Any, cfg: DataConfig) -> Any:
    """`data.train_limit` (the first N images; image files: the first N of each class in turn, so
    every class is kept) or `data.train_subset` (N per class, a seeded choice), for every source."""
    if cfg.train_subset is not None:
        gen = torch.Generator().manual_seed(cfg.train_subset.seed)
        order = torch.randperm(len(train), generator=gen)
        picked = [order[train.targets[order] == c][:cfg.train_subset.per_class] for c in range(train.num_classes)]
        return subset(train, torch.cat(picked).sort().values)
    if not cfg.train_limit or cfg.train_limit >= len(train):
        return train
    if isinstance(train, ImageFolderSet):  # listed class by class: interleave the classes
        t = train.targets
        rank_in_class = torch.arange(len(t)) - torch.searchsorted(t.contiguous(), t, side="left")
        order = torch.argsort(rank_in_class * train.num_classes + t, stable=True)
        return subset(train, order[:cfg.train_limit].sort().values)
    return subset(train, torch.arange(cfg.train_limit))


def _channels(s: ImageSet, cfg: DataConfig) -> ImageSet:
    """Convert to the recipe's `channels` where it asks for other than the data's own."""
    if not cfg.channels or cfg.channels == s.channels:
        return s
    x = s.images.expand(-1, 3, -1, -1) if cfg.channels == 3 else s.images.float().mean(1, keepdim=True).round().to(torch.uint8)
    return ImageSet(x.contiguous(), s.targets, s.class_names)


def subset(s: Any, index: torch.Tensor) -> Any:
    """The images at `index` of any dataset (each kind keeps its own representation)."""
    if not hasattr(s, "subset"):
        raise DataError(f"{type(s).__name__}: taking a subset is not supported for this data")
    return s.subset(index)
