"""FKD label store: pay for the teacher once, replay its region-level soft labels later.

For every epoch and image the store holds M RandomResizedCrop boxes (normalised to [0, 1], fp16,
as FKD keeps them), their flips, the label source's soft label on each crop as top-k fp16 values +
int16 class ids (or all classes, dense fp16), the FerKD keep mask when a calibrator made it, and the
SelfMix partner and region/ratio when the store mixes. A training step then replays exactly those
crops through `distill.augment.apply_crops` and decodes the stored labels: no teacher is built.

Layout of a store directory:
- `store.json`: what the store is (`StoreSpec`), written when generation starts; a later run with
  another recipe, data or teacher is refused instead of mixing two stores.
- `shards/eEEEE-cCCCCC.safetensors`: one epoch × one chunk of `shard_images` consecutive images.
- `parts/rankR.jsonl`: each rank's journal of finished shards (bytes, sha256, band counts),
  append-only, so a killed generation resumes from its last complete shard.
- `manifest.json`: the spec + every shard's record, merged from the journals once all shards exist
  (no second pass over the data), written atomically. Readers trust nothing without it.
Randomness is seeded per (seed, epoch, chunk), so a store is byte-identical whatever the number of
ranks or restarts that wrote it. Nothing is unpickled: safetensors and JSON only.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save as safetensors_save
from torch import Tensor
from torch.utils.data import DataLoader

from distill.artefacts import (ArtefactError, append_jsonl, atomic_path, load_tensors, read_jsonl, sha256_file,
                               versions, write_text)
from distill.augment import apply_crops, sample_crops
from distill.imagefiles import ImageFiles, RandomCropPlan, StoredCropPlan, TrainViews, collate_views_with_boxes
from distill.progress import Progress
from teachers.regions import apply_selfmix, compress_topk, decompress, mix_labels, sample_selfmix
from teachers.source import Batch, LabelSource, QueryCost, SoftLabels

STORE_FORMAT = "distill.labelstore/1"
SPEC_FILE, MANIFEST_FILE, SHARD_DIR, PART_DIR = "store.json", "manifest.json", "shards", "parts"
SHARD_HEADER = "distill.labelstore"  # the one safetensors metadata key of a shard
DECODE_MODES = ("marginal_smoothing", "marginal_renorm", "hard")  # teachers.regions.decompress
MAX_IMAGE_SIZE = 2048  # fp16 boxes normalised by the image size round back to whole pixels up to here
REPAIR = "; delete it and rerun `distill labels` with the store's recipe to regenerate it (shards are deterministic)"


@dataclass(frozen=True)
class StoreSpec:
    """Everything that identifies a store and fixes its layout."""

    config_hash: str  # the generating recipe's identity (distill.generate_store.generation_hash)
    label_source: str  # e.g. "ensemble(a, b) + FerKD calibration"
    teachers: tuple[str, ...]
    class_names: tuple[str, ...]
    data_fingerprint: str
    image_size: int
    num_images: int
    epochs: int
    crops_per_image: int
    topk: int  # == num_classes: dense fp16, no class ids
    shard_images: int
    seed: int
    scale: tuple[float, float]
    ratio: tuple[float, float]
    flip_prob: float
    selfmix_mode: str | None = None  # cutmix | mixup | None
    selfmix_alpha: float = 1.0
    calibration: dict[str, Any] | None = field(default=None, hash=False)
    # what boxes are fractions of: `square`, the in-memory image at image_size; `original`, the
    # decoded photo of an image file (cut in loader workers, distill.imagefiles)
    crop_frame: str = "square"

    def __post_init__(self) -> None:
        if not 1 <= self.topk <= len(self.class_names):
            raise ValueError(f"topk must be in [1, {len(self.class_names)}], got {self.topk}")
        if self.image_size > MAX_IMAGE_SIZE:
            raise ValueError(f"image_size {self.image_size} > {MAX_IMAGE_SIZE}: fp16 boxes would not round back exactly")
        if self.selfmix_mode not in (None, "cutmix", "mixup"):
            raise ValueError(f"selfmix_mode {self.selfmix_mode!r}; allowed: cutmix, mixup, None")
        if self.crop_frame not in ("square", "original"):
            raise ValueError(f"crop_frame {self.crop_frame!r}; allowed: square, original")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def dense(self) -> bool:
        return self.topk == self.num_classes

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num_images / self.shard_images)

    def chunk_range(self, chunk: int) -> tuple[int, int]:
        lo = chunk * self.shard_images
        return lo, min(lo + self.shard_images, self.num_images)

    def shards(self) -> Iterator[tuple[int, int]]:
        """(epoch, chunk) of every shard, chunk-major: a rank decodes a chunk once for all epochs."""
        for c in range(self.num_chunks):
            for e in range(self.epochs):
                yield e, c

    @staticmethod
    def shard_name(epoch: int, chunk: int) -> str:
        return f"e{epoch:04d}-c{chunk:05d}.safetensors"

    def to_json(self) -> dict[str, Any]:
        """JSON-normal form (tuples as lists), so a spec compares equal to its file's contents."""
        return json.loads(json.dumps({"format": STORE_FORMAT, **asdict(self)}))

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str) -> "StoreSpec":
        if d.get("format") != STORE_FORMAT:
            raise ArtefactError(f"{source}: not a label store (format {d.get('format')!r}, want {STORE_FORMAT!r})")
        try:
            d = {k: v for k, v in d.items() if k != "format"}
            for k in ("teachers", "class_names", "scale", "ratio"):
                d[k] = tuple(d[k])
            return cls(**d)
        except (KeyError, TypeError, ValueError) as err:
            raise ArtefactError(f"{source}: store description is damaged ({err})") from None


def shard_generator(seed: int, epoch: int, chunk: int) -> torch.Generator:
    """One generator per shard, keyed by what the shard is, not by who writes it or when."""
    digest = hashlib.sha256(f"distill.labelstore:{seed}:{epoch}:{chunk}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ------------------------------------------------------------------------------ label sources


class RowBatched:
    """A label source that asks the wrapped one `rows` crops at a time (teacher memory), so a
    calibrator above it can still rank an image's whole crop bank in one call."""

    def __init__(self, source: LabelSource, rows: int):
        self.source, self.rows = source, rows

    @property
    def num_classes(self) -> int:
        return self.source.num_classes

    @property
    def cost(self) -> QueryCost:
        return self.source.cost

    def soft_labels(self, images: Tensor, targets: Tensor | None = None, index: Tensor | None = None) -> SoftLabels:
        parts = [self.source.soft_labels(images[i:i + self.rows],
                                         None if targets is None else targets[i:i + self.rows],
                                         None if index is None else index[i:i + self.rows])
                 for i in range(0, len(images), self.rows)]
        if len(parts) == 1:
            return parts[0]
        cat = lambda xs: None if any(x is None for x in xs) else torch.cat(xs)  # noqa: E731
        return SoftLabels(probs=torch.cat([p.probs for p in parts]), logits=cat([p.logits for p in parts]),
                          per_teacher={k: torch.cat([p.per_teacher[k] for p in parts]) for k in parts[0].per_teacher},
                          mask=cat([p.mask for p in parts]))


def splice_partners(partner: Tensor, keep: Tensor) -> Tensor:
    """Drop discarded crops from each image's SelfMix cycle: a kept crop's partner becomes the next
    kept crop along the cycle, a discarded crop is its own partner (mixing with itself is the
    identity). Kept crops then never mix with a label FerKD rejected."""
    M = partner.shape[1]
    cur = partner.clone()
    for _ in range(M):
        bad = ~keep.gather(1, cur)
        if not bool(bad.any()):
            break
        cur = torch.where(bad, partner.gather(1, cur), cur)
    self_ids = torch.arange(M).expand_as(partner)
    return torch.where(keep, cur, self_ids)


def label_shard(spec: StoreSpec, images01: Tensor, targets: Tensor, first_index: int, source: LabelSource,
                generator: torch.Generator, images_per_call: int) -> dict[str, Tensor]:
    """Sample M crops per in-memory image, label them with `source` (whole images per call, so a
    calibrator ranks each image's bank), then `finish_shard`. CPU tensors out."""
    n, M, S = len(images01), spec.crops_per_image, spec.image_size
    boxes, flips = sample_crops(n, M, S, spec.scale, spec.ratio, spec.flip_prob, generator)
    probs, masks = [], []
    for lo in range(0, n, images_per_call):
        hi = min(n, lo + images_per_call)
        which = torch.arange(hi - lo, device=images01.device).repeat_interleave(M)
        crops = apply_crops(images01[lo:hi], boxes[lo:hi].reshape(-1, 4), flips[lo:hi].reshape(-1), S, which)
        index = (first_index + torch.arange(lo, hi)).repeat_interleave(M)
        p, m = label_crops(spec, source, crops, targets[lo:hi].to(images01.device).repeat_interleave(M), index)
        probs.append(p)
        masks.append(m)
    return finish_shard(spec, boxes / S, flips, probs, masks, generator)


def label_crops(spec: StoreSpec, source: LabelSource, crops: Tensor, targets: Tensor,
                index: Tensor) -> tuple[Tensor, Tensor | None]:
    """The source's probabilities (and keep mask) on crops of whole images, on the CPU."""
    soft = source.soft_labels(crops, targets, index)
    if soft.probs.shape != (len(crops), spec.num_classes):
        raise ValueError(f"label source gave probabilities {tuple(soft.probs.shape)}, want ({len(crops)}, {spec.num_classes})")
    return soft.probs.float().cpu(), None if soft.mask is None else soft.mask.bool().cpu()


def finish_shard(spec: StoreSpec, boxes01: Tensor, flips: Tensor, probs: list[Tensor], masks: list[Tensor | None],
                 generator: torch.Generator) -> dict[str, Tensor]:
    """A shard's tensors from its crops (normalised boxes `[n, M, 4]`, flips) and their labels:
    kept crops first, SelfMix drawn from `generator`, labels compressed."""
    n, M, S, K = len(boxes01), spec.crops_per_image, spec.image_size, spec.num_classes
    probs_t = torch.cat(probs).reshape(n, M, K)
    keep = None if any(m is None for m in masks) else torch.cat(masks).reshape(n, M)
    out: dict[str, Tensor] = {}
    if keep is not None:  # kept crops first: a student replaying C < M views trains on kept ones
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
        boxes01, flips = boxes01.gather(1, order[..., None].expand(-1, -1, 4)), flips.gather(1, order)
        probs_t, keep = probs_t.gather(1, order[..., None].expand(-1, -1, K)), keep.gather(1, order)
        out["keep"] = keep
    out["boxes"] = boxes01.half()
    out["flips"] = flips
    if spec.dense:
        out["values"] = probs_t.half()
    else:
        values, indices = compress_topk(probs_t.reshape(n * M, K), spec.topk)
        out["values"], out["indices"] = values.reshape(n, M, -1), indices.reshape(n, M, -1)
    if spec.selfmix_mode is not None:
        partner, lam, mix_boxes = sample_selfmix(M, n, spec.selfmix_alpha, spec.selfmix_mode, S, generator)
        if keep is not None:
            partner = splice_partners(partner, keep)
        out["mix_partner"] = partner.to(torch.int16)
        if mix_boxes is None:
            out["mix_lam"] = lam.half()
        else:  # cutmix: λ is the kept area, recomputed from the region at replay
            out["mix_boxes"] = (mix_boxes / S).half()
    return out


def label_file_shard(spec: StoreSpec, train: ImageFiles, epoch: int, lo: int, hi: int, source: LabelSource,
                     generator: torch.Generator, images_per_call: int, device: torch.device,
                     workers: int) -> dict[str, Tensor]:
    """`label_shard` for image files: each image's M crops sampled on the decoded photo (keyed by
    the store's seed, epoch and index) and cut in loader workers by the operator the student's
    replay uses (`distill.imagefiles.cut_views`), from the same fp16 boxes."""
    plan = RandomCropPlan(spec.seed, spec.crops_per_image, spec.scale, spec.ratio, spec.flip_prob)
    loader = DataLoader(TrainViews(train, plan), batch_size=images_per_call, num_workers=workers,
                        sampler=[(epoch, i) for i in range(lo, hi)], collate_fn=collate_views_with_boxes)
    probs, masks, boxes, flips = [], [], [], []
    for batch in filter(None, loader):  # None: every image of the batch was skipped (on_bad_image: skip)
        views, targets, index, b, f = batch
        p, m = label_crops(spec, source, views.to(device).float().div_(255), targets.to(device), index)
        probs.append(p)
        masks.append(m)
        boxes.append(b)
        flips.append(f)
    if sum(map(len, boxes)) != hi - lo:
        raise ArtefactError(f"a label store needs every training image: some of images {lo}..{hi - 1} did not decode "
                            f"(data.on_bad_image: skip); remove those files and regenerate")
    return finish_shard(spec, torch.cat(boxes), torch.cat(flips), probs, masks, generator)


def _shard_keys(spec: StoreSpec, calibrated: bool) -> set[str]:
    keys = {"boxes", "flips", "values"} | ({"keep"} if calibrated else set()) | (set() if spec.dense else {"indices"})
    if spec.selfmix_mode is not None:
        keys |= {"mix_partner", "mix_lam" if spec.selfmix_mode == "mixup" else "mix_boxes"}
    return keys


# ------------------------------------------------------------------------------------- writer


class StoreWriter:
    """Shards + per-rank journals + the merged manifest. Rank r of W writes the chunks c with
    c % W == r (every epoch of them); any rank merges once every shard is journalled."""

    def __init__(self, root: str | Path, spec: StoreSpec, rank: int = 0, world: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.root, self.spec, self.rank, self.world = Path(root), spec, rank, world
        spec_path = self.root / SPEC_FILE
        if spec_path.exists():
            old = _read_json(spec_path)
            if old != spec.to_json():
                diff = sorted(k for k in set(old) | set(spec.to_json()) if old.get(k) != spec.to_json().get(k))
                raise ArtefactError(f"{self.root}: holds a label store written for another recipe or data "
                                    f"(differs in {', '.join(diff)}); choose another labels.store or delete it")
        else:
            write_text(spec_path, json.dumps(spec.to_json(), indent=1))
        self.journal = self.root / PART_DIR / f"rank{rank:04d}.jsonl"

    def completed(self) -> dict[str, dict[str, Any]]:
        """Shards journalled by any rank (any earlier world size) whose file is there at full size."""
        done = {}
        for part in sorted((self.root / PART_DIR).glob("rank*.jsonl")):
            for rec in read_jsonl(part):
                path = self.root / SHARD_DIR / rec.get("file", "")
                if path.is_file() and path.stat().st_size == rec.get("bytes"):
                    done[rec["file"]] = rec
        return done

    def pending(self) -> list[tuple[int, int]]:
        done = self.completed()
        return [(e, c) for e, c in self.spec.shards()
                if c % self.world == self.rank and self.spec.shard_name(e, c) not in done]

    def write(self, epoch: int, chunk: int, tensors: dict[str, Tensor], bands: list[int] | None) -> dict[str, Any]:
        name = self.spec.shard_name(epoch, chunk)
        first, end = self.spec.chunk_range(chunk)
        path = self.root / SHARD_DIR / name
        # one metadata entry: safetensors writes several in hash-map order, which would make
        # identical shards differ byte for byte between runs
        header = {"format": STORE_FORMAT, "config_hash": self.spec.config_hash,
                  "data_fingerprint": self.spec.data_fingerprint, "epoch": epoch, "chunk": chunk,
                  "first_image": first, "num_images": end - first, "versions": versions()}
        blob = safetensors_save({k: v.contiguous() for k, v in tensors.items()},
                                metadata={SHARD_HEADER: json.dumps(header, sort_keys=True)})
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(blob)
        rec = {"file": name, "epoch": epoch, "chunk": chunk, "first_image": first, "num_images": end - first,
               "bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest(), "bands": bands}
        (self.root / PART_DIR).mkdir(parents=True, exist_ok=True)
        append_jsonl(self.journal, rec)
        return rec

    def merge(self) -> dict[str, Any] | None:
        """Write manifest.json if every shard is journalled; else None (other ranks still working)."""
        done = self.completed()
        names = [self.spec.shard_name(e, c) for e, c in sorted(self.spec.shards())]
        if any(n not in done for n in names):
            return None
        shards = [done[n] for n in names]
        total = sum(r["bytes"] for r in shards)
        crops = self.spec.num_images * self.spec.epochs * self.spec.crops_per_image
        manifest = {**self.spec.to_json(), "shards": shards, "bytes": total,
                    "bytes_per_crop": total / crops, "bytes_per_image_epoch": total / (crops / self.spec.crops_per_image)}
        bands = [r["bands"] for r in shards if r["bands"] is not None]
        if bands:
            counts = [sum(col) for col in zip(*bands)]
            manifest["band_fractions"] = dict(zip(("discard_hard", "calibrate", "keep", "discard_easy"),
                                                  (c / max(sum(counts), 1) for c in counts)))
        write_text(self.root / MANIFEST_FILE, json.dumps(manifest, indent=1))
        return manifest


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtefactError(f"{path}: not readable JSON ({err}); the store is damaged") from None
    if not isinstance(d, dict):
        raise ArtefactError(f"{path}: not a JSON object; the store is damaged")
    return d


def generate_store(root: str | Path, spec: StoreSpec, train, source: LabelSource, device: torch.device,
                   batch_size: int = 256, rank: int = 0, world: int = 1, progress: bool = True,
                   calibrator=None, workers: int = 0) -> dict[str, Any] | None:
    """Write this rank's missing shards, then try to merge. Returns the manifest, or None while
    other ranks' shards are missing. `calibrator` (a RegionCalibrator inside `source`) adds per-shard
    band counts to the journal. Image files are decoded by `workers` loader processes, once per
    (epoch, chunk): their crops are cut from the photo as it is decoded."""
    files = isinstance(train, ImageFiles)
    if files:
        spec = replace(spec, crop_frame="original")
    writer = StoreWriter(root, spec, rank, world)
    todo = writer.pending()
    per_call = max(1, batch_size // spec.crops_per_image)
    bar = Progress(total=sum(spec.chunk_range(c)[1] - spec.chunk_range(c)[0] for _, c in todo), unit="img",
                   desc=f"labels {Path(root).name} rank {rank}/{world}", enabled=progress)
    by_chunk: dict[int, list[int]] = {}
    for e, c in todo:
        by_chunk.setdefault(c, []).append(e)
    for c, epochs in by_chunk.items():
        lo, hi = spec.chunk_range(c)
        if not files:
            images01 = train.images[lo:hi].to(device).float().div_(255)
        for e in epochs:
            if calibrator is not None:
                calibrator.reset_stats()
            gen = shard_generator(spec.seed, e, c)
            if files:
                tensors = label_file_shard(spec, train, e, lo, hi, source, gen, per_call, device, workers)
            else:
                tensors = label_shard(spec, images01, train.targets[lo:hi], lo, source, gen, per_call)
            bands = calibrator.band_counts.tolist() if calibrator is not None else None
            writer.write(e, c, tensors, bands)
            bar.update(hi - lo)
    bar.close()
    return writer.merge()


# ------------------------------------------------------------------------------------- reader


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
        self.manifest = _read_json(self.root / MANIFEST_FILE)
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
        keys = _shard_keys(self.spec, self.calibrated)
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

