"""HeLlO projectors in peft's adapter format: a saved projector (`projector.safetensors`) exported
as a directory `peft.PeftModel.from_pretrained` loads like any LoRA adapter, and read back by distill.

    adapter_config.json        peft's LoraConfig              } written by peft's own
    adapter_model.safetensors  the LoRA factors, peft's names } `PeftModel.save_pretrained`
    README.md                  peft's model card              } (factors in their stored dtype)
    distill_projector.json     what rebuilds the base: the projector's metadata (config, class
                               names, base checksum, encoder input size, data image size and
                               channels, teachers, versions) + sha256 and bytes of the files below
    distill_head.safetensors   the head weight, for heads that are not regenerable (prototype,
                               random); a text head is rebuilt from the class names

The base the adapter loads onto is the projector without LoRA (`adapter_base`); distill reads the
directory back with `load_peft_adapter` (the projector `load_projector` gives, the same refusals,
plus adapter files changed after export). `synth.projector.projector_path` tells the formats apart.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from synth.projector import (ADAPTER_CONFIG, ADAPTER_META, FORMAT, Projector, ProjectorConfig, apply_lora, lora_config,
                             projector_path, rebuild_base)

ADAPTER_FORMAT = "distill.projector.peft/1"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
HEAD_FILE = "distill_head.safetensors"
# the LoraConfig fields that change what an adapter computes; adapter_config.json must agree on them
_LORA_KEYS = ("peft_type", "r", "lora_alpha", "target_modules", "bias", "use_rslora", "use_dora", "lora_bias",
              "fan_in_fan_out", "rank_pattern", "alpha_pattern", "layers_to_transform", "exclude_modules",
              "modules_to_save")


def export_peft_adapter(projector: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None,
                        overwrite: bool = False) -> Path:
    """Write the projector at `projector` (its file, or a directory holding it or its labels/) as
    a peft adapter directory `out_dir`; `checkpoint`: this machine's copy of the base encoder (its
    checksum must match). Atomic: written into a temporary sibling and renamed, so `out_dir` is
    whole or absent. An existing `out_dir` is refused unless empty, or an earlier export with
    `overwrite`."""
    from peft import get_peft_model  # heavy: LoRA only

    src, out = projector_path(projector), Path(out_dir)
    if src.is_dir():
        raise ValueError(f"{src}: already a peft adapter")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not (overwrite and (out / ADAPTER_META).is_file()):
        raise FileExistsError(f"{out}: exists and is not empty (overwrite=True replaces an earlier export, "
                              f"nothing else)")
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{src}: not a HeLlO projector file (format {meta.get('format')!r})")
    cfg = None
    if checkpoint is not None:
        cfg = ProjectorConfig.from_dict({**json.loads(meta["config"]), "checkpoint": str(checkpoint)})
    head = tensors.pop("head.weight", None)
    base = rebuild_base(meta, head, cfg)
    model = get_peft_model(base, lora_config(base))  # injects into `base` in place: its names are the stored ones
    lora = base.lora_state_dict()
    if set(lora) != set(tensors):
        raise ValueError(f"{src}: factors do not match the LoRA layout: {sorted(set(lora) ^ set(tensors))[:6]}")
    for n, p in lora.items():
        p.data = tensors[n]  # the stored dtype (fp16 factors stay fp16: what distill serves)
    record = {k: _natural(v) for k, v in meta.items()} | {"format": ADAPTER_FORMAT}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed export
    try:
        model.save_pretrained(str(tmp))
        if head is not None:
            save_file({"head.weight": head.contiguous()}, str(tmp / HEAD_FILE), metadata={"format": ADAPTER_FORMAT})
        record["files"] = {n: _digest(tmp / n) for n in (ADAPTER_WEIGHTS, HEAD_FILE) if (tmp / n).is_file()}
        (tmp / ADAPTER_META).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if out.exists():  # empty, or an earlier export with overwrite: swap, then drop the old one
            old = out.with_name(f".{out.name}.{os.getpid()}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def adapter_metadata(path_dir: str | Path) -> dict[str, Any]:
    """distill's record beside the adapter (ADAPTER_META), values JSON-decoded like
    `distill.artefacts.read_metadata` decodes a projector file's."""
    path = Path(path_dir) / ADAPTER_META
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    if not isinstance(record, dict) or record.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: not a HeLlO projector adapter record (format {ADAPTER_FORMAT!r})")
    return record


def adapter_base(path_dir: str | Path, cfg: ProjectorConfig | None = None,
                 class_names: Sequence[str] | None = None) -> Projector:
    """The projector without LoRA, rebuilt from the adapter directory's record: the base that
    `peft.PeftModel.from_pretrained(adapter_base(d), d)` loads the adapter onto. Same refusals as
    `load_projector`."""
    meta, head = _read(Path(path_dir))
    return rebuild_base(meta, head, cfg, class_names)


def load_peft_adapter(path_dir: str | Path, cfg: ProjectorConfig | None = None,
                      class_names: Sequence[str] | None = None, device: str | torch.device = "cpu") -> Projector:
    """The projector an adapter directory holds, as `load_projector` returns it (LoRA trainable,
    base pinned). Refuses what `load_projector` refuses, and an adapter_config.json, adapter
    weights or head that differ from what was exported."""
    from peft import set_peft_model_state_dict  # heavy: LoRA only

    path = Path(path_dir)
    meta, head = _read(path)
    proj = apply_lora(rebuild_base(meta, head, cfg, class_names))
    saved = json.loads((path / ADAPTER_CONFIG).read_text())
    want = proj.peft_config["default"].to_dict()
    diff = [k for k in _LORA_KEYS if _plain(saved.get(k)) != _plain(want.get(k))]
    if diff:
        raise ValueError(f"{ADAPTER_CONFIG} differs from the projector's LoRA in {diff}")
    lora = proj.lora_state_dict()
    try:
        res = set_peft_model_state_dict(proj, load_file(str(path / ADAPTER_WEIGHTS)))
    except RuntimeError as err:  # a shape mismatch
        raise ValueError(f"{ADAPTER_WEIGHTS} does not match the LoRA layout: {err}") from None
    missing = [k for k in res.missing_keys if k in lora]
    if missing or res.unexpected_keys:
        raise ValueError(f"{ADAPTER_WEIGHTS} does not match the LoRA layout: missing {missing[:6]}, "
                         f"unexpected {res.unexpected_keys[:6]}")
    return proj.to(device).eval()


def _read(path: Path) -> tuple[dict[str, str], torch.Tensor | None]:
    """(the record as `save_projector` metadata, string values; the stored head or None), after
    checking the files the record lists against their sha256."""
    record = adapter_metadata(path)
    for name, want in record.get("files", {}).items():
        if not (path / name).is_file() or _digest(path / name) != want:
            raise ValueError(f"{path / name}: missing or changed since export (sha256 differs from {ADAPTER_META})")
    head = load_file(str(path / HEAD_FILE))["head.weight"] if HEAD_FILE in record.get("files", {}) else None
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in record.items() if k != "files"}
    return meta, head


def _natural(value: str) -> Any:
    """A metadata string as the JSON value it spells, when that is exact (json.dumps gives it back)."""
    try:
        decoded = json.loads(value)
    except ValueError:
        return value
    return decoded if not isinstance(decoded, str) and json.dumps(decoded) == value else value


def _plain(value: Any) -> Any:
    """Sets and tuples as sorted lists, so a config field compares equal to its JSON form."""
    return sorted(value) if isinstance(value, (set, frozenset)) else list(value) if isinstance(value, tuple) else value


def _digest(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
