"""Data: the built-in digits, `.npz` arrays and ImageFolder trees, all served the same way.

Every dataset yields `(uint8 image [C, S, S], target, index)` at the recipe's square `image_size`
and carries its `class_names` (they travel into every artefact). Training augmentation happens
per batch on float images (`distill.augment`), where crop boxes can be recorded and replayed.
"""
from __future__ import annotations

import hashlib
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from distill.config import DataConfig
from distill.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


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

    def fingerprint(self) -> str:
        """Identity of the data (images, targets, classes): artefacts derived from it carry this."""
        h = hashlib.sha256()
        h.update(self.images.numpy().tobytes())
        h.update(self.targets.numpy().tobytes())
        h.update("\x00".join(self.class_names).encode())
        return h.hexdigest()[:16]


class ImageFolderSet(ImageSet):
    """`root/<class>/<image>` read lazily with PIL, resized (short side) and centre-cropped to S.
    A file that does not decode raises a DataError naming it, or (`on_bad_image="skip"`) yields
    None — `collate_skipping` drops it from its batch — and is counted in `skipped`, shared with
    the DataLoader's worker processes."""

    def __init__(self, root: Path, image_size: int, channels: int, class_names: tuple[str, ...] | None = None,
                 on_bad_image: str = "error"):
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not classes:
            raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
        if class_names is not None and tuple(classes) != tuple(class_names):
            raise DataError(f"{root}: class folders {classes} differ from the training classes {list(class_names)}")
        self.files: list[Path] = []
        targets = []
        empty = []
        for c, name in enumerate(classes):
            files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            empty += [name] * (not files)
            self.files += files
            targets += [c] * len(files)
        if empty:
            raise DataError(f"{root}: class folder(s) {empty[:8]} hold no images with suffix {sorted(IMAGE_SUFFIXES)}; "
                            f"every class needs images (remove the folder, or add its images)")
        self.targets, self.class_names = torch.tensor(targets), tuple(classes)
        self._size, self._channels, self.on_bad_image = image_size, channels, on_bad_image
        self._skipped = multiprocessing.Value("i", 0)  # inherited by forked DataLoader workers

    @property
    def skipped(self) -> int:
        """Files left out so far because they did not decode (`on_bad_image: skip`)."""
        return self._skipped.value

    def __getitem__(self, i: int):
        try:
            return self._decode(i), self.targets[i], i
        except (OSError, ValueError, SyntaxError) as err:  # what PIL raises for broken/unknown files
            if self.on_bad_image == "error":
                raise DataError(f"{self.files[i]}: cannot be decoded as an image ({err}); fix or remove the file, or "
                                f"set data.on_bad_image: skip to leave such files out (counted in the report)") from None
            with self._skipped.get_lock():
                self._skipped.value += 1
            return None

    def _decode(self, i: int) -> torch.Tensor:
        from PIL import Image  # only image files need it

        with Image.open(self.files[i]) as im:
            im = im.convert("L" if self._channels == 1 else "RGB")
            w, h = im.size
            s = self._size / min(w, h)
            im = im.resize((max(self._size, round(w * s)), max(self._size, round(h * s))), Image.BILINEAR)
            left, top = (im.size[0] - self._size) // 2, (im.size[1] - self._size) // 2
            im = im.crop((left, top, left + self._size, top + self._size))
            arr = np.asarray(im, dtype=np.uint8).reshape(self._size, self._size, self._channels)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    @property
    def channels(self) -> int:
        return self._channels

    @property
    def image_size(self) -> int:
        return self._size

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f, t in zip(self.files, self.targets.tolist()):
            h.update(f"{f.name}:{t}:{f.stat().st_size}\n".encode())
        h.update(f"{self._size}:{self._channels}".encode())
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


def load_imagefolder_sets(root: Path, image_size: int, channels: int,
                          on_bad_image: str = "error") -> tuple[ImageFolderSet, ImageFolderSet]:
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"{root}: an ImageFolder root holds train/ and val/ (or test/), each with one folder per class")
    train = ImageFolderSet(root / "train", image_size, channels, on_bad_image=on_bad_image)
    return train, ImageFolderSet(test_dir, image_size, channels, train.class_names, on_bad_image)


def data_config_for(spec: str, image_size: int, channels: int) -> DataConfig:
    """'digits' | a .npz file | an ImageFolder root → a data config at the model's input size."""
    if spec == "digits":
        return DataConfig(source="digits", image_size=image_size, channels=channels)
    path = Path(spec)
    if not path.exists():
        raise DataError(f"--data {spec!r}: not 'digits' and no such file or folder")
    source = "npz" if path.suffix == ".npz" else "imagefolder"
    return DataConfig(source=source, path=path, image_size=image_size, channels=channels)


def load_data(cfg: DataConfig) -> tuple[ImageSet, ImageSet]:
    """(train, test) as the recipe describes them; `channels` converts when the recipe asks."""
    if cfg.source == "digits":
        train, test = load_digits_sets(cfg.image_size)
    elif cfg.source == "npz":
        train, test = load_npz_sets(cfg.path, cfg.image_size)
    else:
        return load_imagefolder_sets(cfg.path, cfg.image_size, cfg.channels or 3, cfg.on_bad_image)
    if cfg.channels and cfg.channels != train.channels:
        train, test = (_convert_channels(s, cfg.channels) for s in (train, test))
    if cfg.train_limit:
        train = subset(train, torch.arange(min(cfg.train_limit, len(train))))
    return train, test


def load_split(cfg: DataConfig, split: str) -> ImageSet:
    """One split, without decoding the other's images (`distill eval` scores one)."""
    if split not in ("train", "test"):
        raise DataError(f"split {split!r}; allowed: train, test")
    if cfg.source != "npz":  # ImageFolder sets are lazy (a listing reads no image); digits are built in
        return load_data(cfg)[0 if split == "train" else 1]
    data = load_npz_sets(cfg.path, cfg.image_size, (split,))[0]
    if cfg.channels and cfg.channels != data.channels:
        data = _convert_channels(data, cfg.channels)
    if split == "train" and cfg.train_limit:
        data = subset(data, torch.arange(min(cfg.train_limit, len(data))))
    return data


def _convert_channels(s: ImageSet, channels: int) -> ImageSet:
    x = s.images.expand(-1, 3, -1, -1) if channels == 3 else s.images.float().mean(1, keepdim=True).round().to(torch.uint8)
    return ImageSet(x.contiguous(), s.targets, s.class_names)


def subset(s: ImageSet, index: torch.Tensor) -> ImageSet:
    if isinstance(s, ImageFolderSet):
        raise DataError("subsets of ImageFolder data are not supported; use a smaller folder")
    return ImageSet(s.images[index], s.targets[index], s.class_names)
