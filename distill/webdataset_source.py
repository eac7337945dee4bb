"""WebDataset shards (`data: {source: webdataset, urls: DIR/train-{000000..000146}.tar}`).

The shards are plain tar files in the WebDataset layout (`KEY.jpg` + `KEY.cls` per sample, KEY the
sample's position in its split), written by `distill data pack` with a `manifest.json` beside them
(class names, per-shard counts, bytes and sha256, every sample's class). They are read with the
standard library's `tarfile`, not the `webdataset` package: its node split reads
torch.distributed and its shuffles draw from process-global or time-seeded RNGs, while here every
epoch's order must be a function of (seed, epoch) for an exact resume. Any WebDataset reader
(webdataset, timm's `wds/` reader) reads these shards too.

Training streams shards: each epoch deals a seeded permutation of the shards to ranks, then to
loader workers (no image twice in one pass), shuffles within a buffer, and cycles so every rank
yields the same number of batches. Test images and label-store generation read by index through
a lazily built table of member offsets.
"""
from __future__ import annotations

import json
import multiprocessing
import random
import re
import tarfile
from pathlib import Path
from typing import Iterator

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from distill.errors import DataError
from distill.imagefiles import JPEG_SUFFIXES, CropPlan, EvalTransform, ImageFiles, cut_views, decode_image, keyed_seed

MANIFEST = "manifest.json"
PACK_FORMAT = "distill.webdataset/1"
IMAGE_EXTS = ("jpg", "jpeg", "png", "bmp", "webp")


def expand_urls(pattern: str) -> list[str]:
    """`a-{000..002}.tar` → a-000.tar, a-001.tar, a-002.tar (zero padding kept); `::` or `,`
    separates several patterns. Local paths only."""
    out: list[str] = []
    for part in re.split(r"::|,", pattern):
        m = re.search(r"\{(\d+)\.\.(\d+)\}", part)
        if m is None:
            out.append(part)
            continue
        lo, hi = m.group(1), m.group(2)
        for k in range(int(lo), int(hi) + 1):
            out += expand_urls(part[:m.start()] + str(k).zfill(len(lo)) + part[m.end():])
    return out


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: the shards' manifest is missing or unreadable ({err}); shards for data.source "
                        f"webdataset are written by `distill data pack IMAGEFOLDER OUT_DIR` with a manifest beside them") from None
    if d.get("format") != PACK_FORMAT:
        raise DataError(f"{path}: not a shard manifest (format {d.get('format')!r}, want {PACK_FORMAT!r})")
    return d


class WebDatasetSet(ImageFiles):
    """One split of packed shards. `set[i]` is test image i (read through the offset table);
    `keys` are the samples' positions in the split (a subset keeps some)."""

    def __init__(self, urls: str, image_size: int, channels: int, on_bad_image: str = "error",
                 eval_transform: EvalTransform | None = None, split: str | None = None):
        super().__init__(image_size, channels, eval_transform, on_bad_image)
        paths = [Path(u) for u in expand_urls(urls)]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise DataError(f"data.urls {urls!r}: {len(missing)} shard(s) do not exist, e.g. {missing[:3]}")
        manifest = read_manifest(paths[0].parent)
        by_file = {(s, r["file"]): r for s, info in manifest["splits"].items() for r in info["shards"]}
        split = split or next((s for s, f in by_file if f == paths[0].name), "train")
        records = [by_file.get((split, p.name)) for p in paths]
        unknown = [p.name for p, r in zip(paths, records) if r is None]
        if unknown:
            raise DataError(f"data.urls {urls!r}: shard(s) {unknown[:3]} are not {split} shards listed in "
                            f"{paths[0].parent / MANIFEST}; give shards of one pack and split")
        self.paths, self.records = paths, records
        self.class_names = tuple(manifest["class_names"])
        all_targets = torch.tensor(manifest["splits"][split]["targets"])
        self.keys = torch.cat([torch.arange(r["first"], r["first"] + r["images"]) for r in records])
        self.targets = all_targets[self.keys]
        self._offsets: dict[int, tuple[int, int, int, str]] | None = None  # key → (shard, offset, size, ext)

    def name(self, i: int) -> str:
        return f"sample {int(self.keys[i]):08d} of {self.paths[0].parent}"

    def read(self, i: int) -> tuple[bytes, bool]:
        if self._offsets is None:
            self._offsets = {}
            for s, path in enumerate(self.paths):
                with tarfile.open(path) as tar:
                    for m in tar.getmembers():
                        key, _, ext = m.name.partition(".")
                        if ext in IMAGE_EXTS:
                            self._offsets[int(key)] = (s, m.offset_data, m.size, ext)
        s, offset, size, ext = self._offsets[int(self.keys[i])]
        with open(self.paths[s], "rb") as f:
            f.seek(offset)
            return f.read(size), f".{ext}" in JPEG_SUFFIXES

    def subset(self, index: Tensor) -> "WebDatasetSet":
        out = object.__new__(WebDatasetSet)
        out.__dict__.update(self.__dict__)
        out.keys, out.targets = self.keys[index], self.targets[index]
        return out

    def fingerprint(self) -> str:
        import hashlib

        h = hashlib.sha256("".join(r["sha256"] for r in self.records).encode())
        h.update(self.keys.numpy().tobytes())
        h.update(f"{self._size}:{self._channels}".encode())
        return h.hexdigest()[:16]

    def samples(self, shards: list[int]) -> Iterator[tuple[int, bytes, bool]]:
        """(position, bytes, is_jpeg) of the kept samples of `shards`, in file order."""
        position = {int(k): i for i, k in enumerate(self.keys.tolist())}
        for s in shards:
            with tarfile.open(self.paths[s], mode="r|") as tar:
                for m in tar:
                    key, _, ext = m.name.partition(".")
                    if ext in IMAGE_EXTS and int(key) in position:
                        yield position[int(key)], tar.extractfile(m).read(), f".{ext}" in JPEG_SUFFIXES


def shard_split(num_shards: int, seed: int, epoch: int, rank: int, world: int, worker: int,
                workers: int) -> list[int]:
    """The shards one worker of one rank reads in an epoch: a permutation keyed by (seed, epoch),
    dealt to ranks, then to workers. Every shard goes to exactly one (rank, worker)."""
    if num_shards < world * workers:
        raise DataError(f"{num_shards} shard(s) cannot feed {world} rank(s) × {workers} loader worker(s): each reads "
                        f"whole shards; pack smaller shards (distill data pack --shard-size) or use fewer workers")
    order = torch.randperm(num_shards, generator=torch.Generator().manual_seed(keyed_seed("shards", seed, epoch)))
    return order.tolist()[rank::world][worker::workers]


class ShardStream(IterableDataset):
    """Training views from shards: `(uint8 [M, C, S, S], target, i, boxes, flips)` per image, the
    crops `plan` gives it. `set_epoch` before each pass (a shared value persistent workers read).
    `cycle`: keep going round this worker's shards (training: the trainer takes a fixed number of
    batches, `len` per rank); otherwise one pass."""

    def __init__(self, files: WebDatasetSet, plan: CropPlan, seed: int, rank: int = 0, world: int = 1,
                 shuffle_buffer: int = 1000, cycle: bool = True):
        self.files, self.plan, self.seed, self.rank, self.world = files, plan, seed, rank, world
        self.shuffle_buffer, self.cycle = shuffle_buffer, cycle
        self._epoch = multiprocessing.Value("i", 0)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch

    def __len__(self) -> int:
        return len(self.files) // self.world

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self._epoch.value
        shards = shard_split(len(self.files.paths), self.seed, epoch, self.rank, self.world, worker, workers)
        rng = random.Random(keyed_seed("buffer", self.seed, epoch, self.rank, worker))
        for i, data, jpeg in self._shuffled(shards, rng):
            image = self._decode(i, data, jpeg)
            if image is None:
                continue
            boxes, flips = self.plan(epoch, i, *image.shape[-2:])
            yield cut_views(image, boxes, flips, self.files.image_size), self.files.targets[i], i, boxes, flips

    def _shuffled(self, shards: list[int], rng: random.Random):
        buffer: list = []
        while True:
            for sample in self.files.samples(shards):
                buffer.append(sample)
                if len(buffer) >= self.shuffle_buffer:
                    yield buffer.pop(rng.randrange(len(buffer)))
            if not self.cycle:
                break
        rng.shuffle(buffer)
        yield from buffer

    def _decode(self, i: int, data: bytes, jpeg: bool):
        files = self.files
        try:
            return decode_image(data, files.channels, jpeg)
        except Exception:  # noqa: BLE001 — the error path of ImageFiles.decoded names the sample
            return files.decoded(i)


def load_webdataset_sets(urls: str, val_urls: str | None, image_size: int, channels: int, on_bad_image: str,
                         eval_transform: EvalTransform | None, splits: tuple[str, ...]) -> list[WebDatasetSet]:
    """The train split from `urls`; the test split from `val_urls`, else the manifest's val split."""
    out = []
    for s in splits:
        if s == "train":
            out.append(WebDatasetSet(urls, image_size, channels, on_bad_image, eval_transform))
            continue
        pattern = val_urls
        if pattern is None:
            folder = Path(expand_urls(urls)[0]).parent
            val = read_manifest(folder)["splits"].get("val")
            if val is None:
                raise DataError(f"{folder / MANIFEST}: no val split; set data.val_urls to the test shards")
            pattern = "::".join(str(folder / r["file"]) for r in val["shards"])
        out.append(WebDatasetSet(pattern, image_size, channels, on_bad_image, eval_transform, "val"))
    if "train" in splits and "test" in splits and out[0].class_names != out[1].class_names:
        raise DataError(f"data.val_urls: classes differ from the training shards' ({urls})")
    return out
