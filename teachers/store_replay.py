"""Reading an FKD label store (the format and the writer: `teachers.store`): `LabelStore` checks a
finished store before use and loads an epoch's rows (each shard verified against its sha256 and
header); `StoredLabeler` is the trainer's labeler that replays those crops and decodes their labels.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from distill.artefacts import ArtefactError, load_tensors, sha256_file
from distill.augment import apply_crops
from distill.imagefiles import ImageFiles, StoredCropPlan
from teachers.regions import apply_selfmix, decompress, mix_labels
from teachers.source import Batch, QueryCost, SoftLabels
from teachers.store import (DECODE_MODES, MANIFEST_FILE, REPAIR, SHARD_DIR, SHARD_HEADER, SPEC_FILE, StoreSpec,
                            read_json, shard_keys)


class LabelStore:
    """A finished store, validated before use: manifest, the shard list, and (per shard, when read)
    size, sha256 and header. Anything wrong is refused naming the file and the fault."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not (self.root / MANIFEST_FILE).is_file():
            if (self.root / SPEC_FILE).is_file():
                raise ArtefactError(f"{self.root}: label generation has not finished (no {MANIFEST_FILE}); "
                                    f"rerun `distill labels` with the same recipe to resume and merge it")
            raise ArtefactError(f"{self.root}: no label store here (no {MANIFEST_FILE}); write one with `distill labels RECIPE`")
        self.manifest = read_json(self.root / MANIFEST_FILE)
        source = str(self.root / MANIFEST_FILE)
        self.spec = StoreSpec.from_json({k: v for k, v in self.manifest.items()
                                         if k not in ("shards", "bytes", "bytes_per_crop", "bytes_per_image_epoch",
                                                      "band_fractions")}, source)
        records = self.manifest.get("shards")
        if not isinstance(records, list):
            raise ArtefactError(f"{source}: has no shard list; the store is damaged")
        self.records = {r.get("file"): r for r in records if isinstance(r, dict)}
        for e, c in self.spec.shards():
            name = self.spec.shard_name(e, c)
            if name not in self.records:
                raise ArtefactError(f"{source}: shard {name} (epoch {e}, images {self.spec.chunk_range(c)}) is missing "
                                    f"from the manifest; the store is incomplete or damaged")
        self.calibrated = self.spec.calibration is not None

    @property
    def bytes(self) -> int:
        return int(self.manifest["bytes"])

    def check_data(self, train) -> None:
        """Refuse a store made for other data: class list, image size, image count, fingerprint."""
        where = f"label store {self.root}"
        if tuple(train.class_names) != self.spec.class_names:
            raise ArtefactError(f"{where}: made for classes {list(self.spec.class_names)[:12]} "
                                f"({self.spec.num_classes}); the data has {list(train.class_names)[:12]} ({train.num_classes})")
        frame = "original" if isinstance(train, ImageFiles) else "square"
        if frame != self.spec.crop_frame:
            raise ArtefactError(f"{where}: its boxes are fractions of the {self.spec.crop_frame} image, but this data "
                                f"({type(train).__name__}) crops the {frame} one; regenerate it for this data")
        if train.image_size != self.spec.image_size:
            raise ArtefactError(f"{where}: made at image_size {self.spec.image_size}; the data is at {train.image_size}")
        if len(train) != self.spec.num_images:
            raise ArtefactError(f"{where}: made for {self.spec.num_images} training images; the data has {len(train)} "
                                f"(data.train_limit or the dataset differ)")
        fp = train.fingerprint()
        if fp != self.spec.data_fingerprint:
            raise ArtefactError(f"{where}: made from another dataset (fingerprint {self.spec.data_fingerprint}, "
                                f"this data {fp}); regenerate it for this data")

    def _check_file(self, name: str) -> Path:
        rec, path = self.records[name], self.root / SHARD_DIR / name
        if not path.is_file():
            raise ArtefactError(f"{path}: shard {name} is missing{REPAIR}")
        size = path.stat().st_size
        if size != rec.get("bytes"):
            what = "truncated" if size < rec.get("bytes", 0) else "has the wrong size"
            raise ArtefactError(f"{path}: shard {name} is {what} ({size} bytes, the manifest says "
                                f"{rec.get('bytes')}){REPAIR}")
        return path

    def check_files(self) -> None:
        """Every shard present at its recorded size: cheap (no reads), run before training starts.
        Contents are checked against their sha256 when an epoch is loaded."""
        for e, c in self.spec.shards():
            self._check_file(self.spec.shard_name(e, c))

    def read_shard(self, epoch: int, chunk: int) -> dict[str, Tensor]:
        name = self.spec.shard_name(epoch, chunk)
        path = self._check_file(name)
        if sha256_file(path) != self.records[name].get("sha256"):
            raise ArtefactError(f"{path}: shard {name} is corrupted (sha256 differs from the manifest's){REPAIR}")
        tensors, meta = load_tensors(path)
        meta = meta.get(SHARD_HEADER) if isinstance(meta.get(SHARD_HEADER), dict) else {}
        first, end = self.spec.chunk_range(chunk)
        expect = {"config_hash": self.spec.config_hash, "data_fingerprint": self.spec.data_fingerprint,
                  "epoch": epoch, "chunk": chunk, "first_image": first, "num_images": end - first}
        bad = {k: meta.get(k) for k, v in expect.items() if meta.get(k) != v}
        if bad:
            raise ArtefactError(f"{path}: shard {name} belongs to another store or place ({bad}, want "
                                f"{ {k: expect[k] for k in bad} })")
        keys = shard_keys(self.spec, self.calibrated)
        if set(tensors) != keys:
            raise ArtefactError(f"{path}: shard {name} holds {sorted(tensors)}, want {sorted(keys)}")
        n, M = end - first, self.spec.crops_per_image
        width = self.spec.num_classes if self.spec.dense else self.spec.topk
        shapes = {"boxes": (n, M, 4), "flips": (n, M), "values": (n, M, width), "indices": (n, M, width),
                  "keep": (n, M), "mix_partner": (n, M), "mix_lam": (n, M), "mix_boxes": (n, M, 4)}
        for k, t in tensors.items():
            if tuple(t.shape) != shapes[k]:
                raise ArtefactError(f"{path}: shard {name}: {k} has shape {tuple(t.shape)}, want {shapes[k]}")
        return tensors

    def load_epoch(self, epoch: int) -> dict[str, Tensor]:
        """Every image's rows for one epoch (verified), indexed by image position."""
        if not 0 <= epoch < self.spec.epochs:
            raise ArtefactError(f"{self.root}: holds epochs 0..{self.spec.epochs - 1}, epoch {epoch} asked for")
        parts = [self.read_shard(epoch, c) for c in range(self.spec.num_chunks)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class StoredLabeler:
    """The trainer's `BatchLabeler` for a store: for a batch of image indices at epoch e, the first
    `crops_per_image` stored crops of each image (multi-crop loading: one loaded image, several
    views), cut with the one crop operator, SelfMix replayed from its stored partner and region,
    stored labels decoded. Views are image-major; targets repeat per view. Queries no teacher.
    `precut` (image files): the loader has already cut those crops from the decoded photos, as
    `crop_plan` told it, so a batch arrives as the views themselves (`[B·V]`, indices repeated)."""

    def __init__(self, store: LabelStore, crops_per_image: int | None = None, decode: str = "marginal_smoothing",
                 precut: bool = False):
        M = store.spec.crops_per_image
        self.store, self.views, self.precut = store, crops_per_image or M, precut
        if not 1 <= self.views <= M:
            raise ValueError(f"labels.crops_per_image: {self.views} views per image asked for; the store {store.root} "
                             f"holds {M} crops per image-epoch (use 1..{M})")
        if decode not in DECODE_MODES:
            raise ValueError(f"labels.decode: {decode!r}; allowed: {', '.join(DECODE_MODES)}")
        if precut and store.spec.selfmix_mode is not None and self.views < M:
            raise ValueError(f"labels.crops_per_image: a SelfMix store of image files mixes each crop with another of "
                             f"its {M}; replay all of them (crops_per_image: {M} or unset)")
        self.decode = decode
        spec, shards = store.spec, store.root / SHARD_DIR
        self.crop_plan = StoredCropPlan([[shards / spec.shard_name(e, c) for c in range(spec.num_chunks)]
                                         for e in range(spec.epochs)], self.views) if precut else None
        self.cost = QueryCost()  # stays empty: nothing is asked of a teacher
        self._epoch: int | None = None
        self._rows: dict[str, Tensor] = {}

    def rows(self, epoch: int) -> dict[str, Tensor]:
        if epoch != self._epoch:
            self._rows, self._epoch = {}, None  # free the previous epoch before loading the next
            self._rows, self._epoch = self.store.load_epoch(epoch), epoch
        return self._rows

    def labels(self, values: Tensor, indices: Tensor | None) -> Tensor:
        C = self.store.spec.num_classes
        if indices is None:  # dense store
            indices = torch.arange(C, device=values.device).expand(values.shape)
        return decompress(values, indices, C, self.decode)

    def __call__(self, images: Tensor, targets: Tensor, index: Tensor, epoch: int,
                 generator: torch.Generator | None = None) -> Batch:
        rows, V, dev = self.rows(epoch), self.views, images.device
        if self.precut:  # one row per view already: the image's index and target are repeated V times
            index, targets = index[::V], targets[::V]
        idx = index.long().cpu()
        B, S = len(idx), images.shape[-1]
        which = torch.arange(B, device=dev).repeat_interleave(V)

        def take(key: str, sel: Tensor | None = None) -> Tensor:
            t = rows[key][idx]  # [B, M, ...]
            t = t[:, :V] if sel is None else t.gather(1, sel.reshape(*sel.shape, *([1] * (t.dim() - 2))).expand(
                *sel.shape, *t.shape[2:]))
            return t.reshape(B * V, *t.shape[2:]).to(dev)

        def cut(sel: Tensor | None) -> Tensor:
            if self.precut:
                return images if sel is None else images[which * V + sel.reshape(-1).to(dev)]
            boxes = (take("boxes", sel).float() * S).round()
            return apply_crops(images, boxes, take("flips", sel), S, which)

        def soft(sel: Tensor | None) -> Tensor:
            return self.labels(take("values", sel), take("indices", sel) if "indices" in rows else None)

        views, probs = cut(None), soft(None)
        mask = take("keep") if "keep" in rows else None
        if "mix_partner" in rows:
            partner = rows["mix_partner"][idx, :V].long()  # ids among the image's M stored crops
            p_views, p_probs = cut(partner), soft(partner)
            pairs = torch.tensor([[1, 0]]).expand(B * V, 2)  # (crop, partner) groups of two
            if "mix_boxes" in rows:
                region = (take("mix_boxes").float() * S).round()
                lam, region2 = torch.ones(B * V, 2), torch.stack([region.cpu(), torch.zeros_like(region.cpu())], 1)
            else:
                lam, region2 = torch.stack([take("mix_lam").float().cpu(), torch.ones(B * V)], 1), None
            mixed, lam_actual = apply_selfmix(torch.stack([views, p_views], 1).flatten(0, 1), pairs, lam, region2)
            views = mixed.reshape(B * V, 2, *mixed.shape[1:])[:, 0]
            probs = mix_labels(torch.stack([probs, p_probs], 1).flatten(0, 1), pairs, lam_actual)
            probs = probs.reshape(B * V, 2, -1)[:, 0]
            if mask is not None:
                mask = mask & take("keep", partner)
        return Batch(views, targets.repeat_interleave(V), SoftLabels(probs=probs, mask=mask))

