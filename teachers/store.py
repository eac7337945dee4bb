"""FKD label store: pay for the teacher once, replay its region-level soft labels later.

For every epoch and image the store holds M RandomResizedCrop boxes (normalised to [0, 1], fp16,
as FKD keeps them), their flips, the label source's soft label on each crop as top-k fp16 values +
int16 class ids (or all classes, dense fp16), the FerKD keep mask when a calibrator made it, and the
SelfMix partner and region/ratio when the store mixes. A training step then replays exactly those
crops through `distill.augment.apply_crops` and decodes the stored labels: no teacher is built
(the reader and the replaying labeler: `teachers.store_replay`).

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

from distill.artefacts import ArtefactError, append_jsonl, atomic_path, read_jsonl, versions, write_text
from distill.augment import apply_crops, sample_crops
from distill.imagefiles import ImageFiles, RandomCropPlan, TrainViews, collate_views_with_boxes
from distill.progress import Progress
from teachers.regions import compress_topk, sample_selfmix
from teachers.source import LabelSource, QueryCost, SoftLabels

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


def shard_keys(spec: StoreSpec, calibrated: bool) -> set[str]:
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
            old = read_json(spec_path)
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


def read_json(path: Path) -> dict[str, Any]:
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
