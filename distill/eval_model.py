"""`distill eval`: a trained model (run directory or checkpoint) on a dataset, classes checked."""
from __future__ import annotations

from pathlib import Path

from distill.data import data_config_for, eval_protocol, load_split
from distill.distributed import resolve_device
from distill.errors import ArtefactError, DataError
from distill.imagefiles import resolve_eval
from distill.models import load_model, read_checkpoint_header
from students.accuracy import evaluate


def evaluate_artefact(target: Path, data: str, split: str = "test", device: str = "auto", workers: int = 0,
                      batch_size: int = 256) -> dict:
    """Top-1/top-5 of a run's student (or a checkpoint) on one split, decoded by `workers` loader
    processes; only that split is read. Image files follow the model's timm evaluation protocol."""
    ckpt = target / "student.safetensors" if target.is_dir() else target
    if not ckpt.is_file():
        raise ArtefactError(f"{target}: no model checkpoint (expected a .safetensors file or a run directory)")
    meta = read_checkpoint_header(ckpt)
    model = load_model(ckpt)
    size = meta["input_size"]
    ds = load_split(data_config_for(data, size, meta["in_chans"]), split, resolve_eval(size, models=(meta["model"],)))
    if tuple(ds.class_names) != tuple(model.class_names):
        raise DataError(f"{data}: classes {list(ds.class_names)[:10]} differ from the model's "
                        f"{list(model.class_names)[:10]} ({ckpt})")
    dev = resolve_device(device)
    return {"images": len(ds), **evaluate(model.to(dev), ds, batch_size, dev, workers), "protocol": eval_protocol(ds)}
