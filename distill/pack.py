"""`distill data pack IMAGEFOLDER OUT_DIR`: an ImageFolder tree → WebDataset tar shards.

Each sample is `KEY.<ext>` (the file's bytes, not re-encoded) + `KEY.cls` (the class index), KEY
its position in its split; the training split is written in a seeded shuffled order, so a shard
mixes classes and `data.train_limit` (the first N) is a class-mixed sample. Shards close at
`--shard-size` bytes. `manifest.json` beside them holds the class names and, per split, every
shard's images, bytes and sha256 and every sample's class.

Resumable and safe: `pack.json` (what is being packed) is checked before anything is written, so a
refused command changes no file; each shard is written to a temp file and renamed, then journalled
in `pack.jsonl`; a rerun skips journalled shards whose file is whole. Tar headers carry no time or
owner, so a pack is byte-identical whatever restarts wrote it.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import torch

from distill.artefacts import append_jsonl, atomic_path, read_jsonl, write_text
from distill.errors import DataError
from distill.imagefiles import ImageFolderSet, keyed_seed
from distill.progress import Progress
from distill.webdataset_source import MANIFEST, PACK_FORMAT

SPEC, JOURNAL = "pack.json", "pack.jsonl"
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'1GB', '500MB', '64KiB', '1000' → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in UNITS or float(m.group(1)) <= 0:
        raise DataError(f"--shard-size {text!r}: a positive size such as 1GB, 500MB, 64KiB or a number of bytes")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def plan_shards(sizes: list[int], shard_bytes: int) -> list[tuple[int, int]]:
    """Consecutive (first, end) ranges, each closed once it holds `shard_bytes` (at least one image)."""
    out, first, total = [], 0, 0
    for i, size in enumerate(sizes):
        if total and total + size > shard_bytes:
            out.append((first, i))
            first, total = i, 0
        total += size
    if first < len(sizes):
        out.append((first, len(sizes)))
    return out


def _tar_bytes(samples: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def pack_imagefolder(root: Path, out: Path, shard_bytes: int = 10**9, seed: int = 0,
                     progress: bool = True) -> dict[str, Any]:
    """Write (or finish) the pack of `root` (train/ and val/ or test/) into `out`; its manifest."""
    root, out = Path(root), Path(out)
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if not (root / "train").is_dir() or test_dir is None:
        raise DataError(f"{root}: an ImageFolder root holds train/ and val/ (or test/), each with one folder per class")
    train = ImageFolderSet(root / "train", 8, 3)
    splits = {"train": train, "val": ImageFolderSet(test_dir, 8, 3, train.class_names)}
    orders = {"train": torch.randperm(len(train), generator=torch.Generator().manual_seed(keyed_seed("pack", seed))),
              "val": torch.arange(len(splits["val"]))}
    sizes = {s: [splits[s].files[i].stat().st_size for i in orders[s].tolist()] for s in splits}
    spec = {"format": PACK_FORMAT, "source": str(root.resolve()), "seed": seed, "shard_bytes": shard_bytes,
            "class_names": list(train.class_names), "images": {s: len(splits[s]) for s in splits},
            "bytes": {s: sum(sizes[s]) for s in splits}}
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose another OUT_DIR")
    if (out / SPEC).is_file():
        old = json.loads((out / SPEC).read_text())
        if old != spec:
            diff = sorted(k for k in spec if old.get(k) != spec[k])
            raise DataError(f"{out}: holds a pack of other data or settings (differs in {', '.join(diff)}); choose "
                            f"another OUT_DIR or delete it")
    elif out.is_dir() and any(out.iterdir()):
        raise DataError(f"{out}: exists and is not empty (and holds no {SPEC}); choose an empty or new OUT_DIR")
    write_text(out / SPEC, json.dumps(spec, indent=1))
    done = {r["file"]: r for r in read_jsonl(out / JOURNAL)
            if (out / r["file"]).is_file() and (out / r["file"]).stat().st_size == r["tar_bytes"]}
    plans = {s: plan_shards(sizes[s], shard_bytes) for s in splits}
    bar = Progress(total=sum(spec["bytes"].values()), unit="B", desc=f"pack {out.name}", enabled=progress)
    records: dict[str, list] = {}
    for s, ranges in plans.items():
        records[s] = []
        for k, (first, end) in enumerate(ranges):
            name = f"{s}-{k:06d}.tar"
            if name not in done:
                files = splits[s]
                samples = []
                for key in range(first, end):
                    i = int(orders[s][key])
                    path = files.files[i]
                    samples += [(f"{key:08d}{path.suffix.lower()}", path.read_bytes()),
                                (f"{key:08d}.cls", str(int(files.targets[i])).encode())]
                blob = _tar_bytes(samples)
                with atomic_path(out / name) as tmp:
                    tmp.write_bytes(blob)
                done[name] = {"file": name, "first": first, "images": end - first, "bytes": sum(sizes[s][first:end]),
                              "tar_bytes": len(blob), "sha256": hashlib.sha256(blob).hexdigest()}
                append_jsonl(out / JOURNAL, done[name])
            records[s].append(done[name])
            bar.update(sum(sizes[s][first:end]))
    bar.close()
    manifest = {"format": PACK_FORMAT, "class_names": list(train.class_names), "source": spec["source"], "seed": seed,
                "splits": {s: {"images": len(splits[s]), "bytes": sum(r["tar_bytes"] for r in records[s]),
                               "shards": records[s], "targets": splits[s].targets[orders[s]].tolist()}
                           for s in splits}}
    write_text(out / MANIFEST, json.dumps(manifest))
    return manifest
