"""Artefact I/O: atomic writes, safetensors with metadata, checksums, nested training state.

Nothing here unpickles: tensors live in safetensors, everything else in JSON.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from distill.errors import ArtefactError

# file names shared by writers and readers in different layers
LABELS_DIR = "labels"  # a distilled dataset's label folder (relabel store or HeLlO projector)
PROJECTOR_FILE = "projector.safetensors"  # a HeLlO projector's factors
# a projector exported as a peft adapter (synth.peft_export): peft's config file + what distill adds
ADAPTER_CONFIG, ADAPTER_META = "adapter_config.json", "distill_projector.json"


def find_projector(path: str | Path) -> Path | None:
    """Where the HeLlO projector at `path` is: a peft adapter directory (ADAPTER_CONFIG +
    ADAPTER_META; either file names it too) as is; else a file as is, or the projector file in the
    directory `path` or in its labels/. None when there is none."""
    p = Path(path)
    if p.is_file() and p.name in (ADAPTER_CONFIG, ADAPTER_META):
        p = p.parent
    if (p / ADAPTER_CONFIG).is_file() and (p / ADAPTER_META).is_file():
        return p
    return next((c for c in (p, p / PROJECTOR_FILE, p / LABELS_DIR / PROJECTOR_FILE) if c.is_file()), None)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename over it only if the block finishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_writable(directory: str | Path, field: str) -> None:
    """Refuse, before any compute, an output directory that cannot be created or written (read-only,
    full, or under a file), naming the recipe field. Checked where it (or its nearest existing
    parent) is, so nothing is left behind."""
    directory = Path(directory).absolute()
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file")
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".write-check-") as f:
            f.write(b"\0" * 65536)  # a full disk fails here, not hours later
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise ArtefactError(f"{field}: cannot write to {directory} ({err.strerror or err}); choose a writable "
                            f"directory (e.g. {field}=/path/with/space) or free space there") from None


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def strict_json(record: Any) -> str:
    """JSON that every parser reads: non-finite floats (a skipped evaluation, a diverged loss)
    become null instead of the NaN/Infinity tokens Python would write."""
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(record), allow_nan=False)


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append one line. A crash can at worst leave a partial last line, which `read_jsonl` skips."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    if not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def versions() -> dict[str, str]:
    try:
        ours = metadata.version("distill")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        ours = "unknown"
    return {"distill": ours, "torch": torch.__version__}


META_KEY = "distill"  # the one safetensors metadata entry holding ours (see save_tensors)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """safetensors with our metadata as one JSON entry (sorted keys): safetensors writes several
    entries in hash-map order, which would make the same content differ byte for byte between runs."""
    meta = {"versions": versions(), **metadata}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(meta, sort_keys=True)})


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The header only (cheap: no tensor is read). Values are JSON-decoded where they parse."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - any parse failure means "not a valid file"
        raise ArtefactError(f"{path}: not a readable safetensors file ({err})") from None
    if set(meta) == {META_KEY}:
        return json.loads(meta[META_KEY])
    out: dict[str, Any] = {}  # files written before META_KEY (or by others): one JSON value per entry
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def load_tensors(path: str | Path, device: str = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise ArtefactError(f"{path}: file does not exist")
    meta = read_metadata(path)
    try:
        return load_file(str(path), device=device), meta
    except Exception as err:  # noqa: BLE001
        raise ArtefactError(f"{path}: corrupted safetensors file ({err})") from None


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ------------------------------------------------------------- nested state (optimizer, etc.)


def _split(obj: Any, tensors: dict[str, torch.Tensor], prefix: str) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if not all(isinstance(k, (str, int)) for k in obj):
            raise TypeError(f"state keys must be str/int at {prefix!r}")
        return {"__dict__": [[k, _split(v, tensors, f"{prefix}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_split(v, tensors, f"{prefix}/{i}") for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} without pickling")


def _join(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _join(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [_join(v, tensors) for v in obj["__list__"]]
    return obj


def save_state(path: str | Path, state: dict[str, Any], metadata: dict[str, Any] | None = None) -> None:
    """Nested dicts/lists of tensors and scalars (model, optimizer, scheduler, counters) → one
    safetensors file: tensors by path, the structure as JSON in the header."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, tensors, "s")
    save_tensors(path, tensors, {**(metadata or {}), "skeleton": skeleton})


def load_state(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    tensors, meta = load_tensors(path)
    if "skeleton" not in meta:
        raise ArtefactError(f"{path}: not a training-state file (no skeleton in its header)")
    return _join(meta.pop("skeleton"), tensors), meta
