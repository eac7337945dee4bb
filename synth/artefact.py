"""The distilled-dataset artefact: one directory that describes itself and is checked on read.

    images.safetensors   `images` [N, C, S, S] (uint8, or fp16 in [0, 1]) + `targets` [N] int64,
                         class-major (image i is class i // IPC)
    labels/              relabel only: an FKD label store (teachers.store format) over these images
    grids/class_NNNN.png one PNG grid per class
    class_names.json     the class list, in target order
    recipe.yaml          the resolved synthesis recipe; its `labels.relabel` is the label spec too
                         (`loss`, `temperature`: how students learn the stored labels; a recipe
                         written before they existed means soft CE at T = 1)
    manifest.json        format, IPC, classes, image size, storage, label mode, teachers (with their
                         checkpoints' sha256), data fingerprint, timing, and every file above with
                         its bytes and sha256; image and label bytes stated separately

`manifest.json` is written last (atomically): a directory without it is not an artefact. Reading
verifies every listed file's size and sha256 and refuses a damaged one by name. Nothing unpickles.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distill.artefacts import LABELS_DIR as LABELS
from distill.artefacts import ArtefactError, atomic_path, load_tensors, save_tensors, sha256_file, write_text
from distill.data import ImageSet

FORMAT = "distill.synth/1"
MANIFEST, IMAGES, CLASSES, RECIPE, GRIDS = "manifest.json", "images.safetensors", "class_names.json", "recipe.yaml", "grids"
NOT_LISTED = ("work", "eval")  # synthesis chunks and evaluation runs live beside, outside the checksum list


def quantise(images01: torch.Tensor, storage: str) -> torch.Tensor:
    x = images01.detach().float().clamp(0, 1).cpu()
    return (x * 255).round().to(torch.uint8) if storage == "uint8" else x.half()


class FloatImageSet(ImageSet):
    """Images kept as float on the 0..255 scale (fp16 artefacts): the trainer and the evaluator
    divide by 255 exactly as for uint8, so nothing downstream needs to know."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, class_names: tuple[str, ...]):
        self.images, self.targets, self.class_names = images.float(), targets.long(), tuple(class_names)


def as_imageset(images: torch.Tensor, targets: torch.Tensor, class_names: tuple[str, ...]) -> ImageSet:
    """Stored tensors → a dataset the trainer reads (fp16 as float on the 0..255 scale)."""
    if images.dtype == torch.uint8:
        return ImageSet(images, targets, class_names)
    return FloatImageSet(images.float() * 255, targets, class_names)


def write_grid(path: Path, images: torch.Tensor, scale: int, cols: int | None = None) -> None:
    """One PNG: the images of a class side by side (rows of `cols`), each upscaled `scale`× (nearest)."""
    from PIL import Image

    x = images.float() if images.dtype != torch.uint8 else images.float() / 255
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    n, c, h, w = x.shape
    cols = cols or min(n, 10)
    rows = -(-n // cols)
    canvas = torch.full((c, rows * (h + 1) + 1, cols * (w + 1) + 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        canvas[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = x[i]
    arr = canvas.permute(1, 2, 0).numpy()
    im = Image.fromarray(arr[..., 0] if c == 1 else arr, mode="L" if c == 1 else "RGB")
    im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def listed_files(root: Path) -> list[str]:
    """Every file of the artefact proper (relative paths), sorted: what the manifest checksums."""
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in NOT_LISTED and str(rel) != MANIFEST and not p.name.startswith("."):
            out.append(rel.as_posix())
    return out


def write_artefact(root: Path, images: torch.Tensor, targets: torch.Tensor, class_names: tuple[str, ...],
                   ipc: int, recipe_yaml: str, info: dict[str, Any], grid_scale: int) -> dict[str, Any]:
    """Write images, grids, class names and the recipe, then the manifest over everything present
    (including a `labels/` store written before). `info` adds the recipe's description fields."""
    root = Path(root)
    save_tensors(root / IMAGES, {"images": images, "targets": targets.long()},
                 {"format": FORMAT, "ipc": ipc, "class_names": list(class_names)})
    write_text(root / CLASSES, json.dumps(list(class_names), indent=1))
    write_text(root / RECIPE, recipe_yaml)
    for c, name in enumerate(class_names):
        write_grid(root / GRIDS / f"class_{c:04d}.png", images[targets == c], grid_scale)
    files = {rel: {"bytes": (root / rel).stat().st_size, "sha256": sha256_file(root / rel)} for rel in listed_files(root)}
    label_bytes = sum(v["bytes"] for k, v in files.items() if k.startswith(LABELS + "/"))
    manifest = {"format": FORMAT, "ipc": ipc, "num_classes": len(class_names), "num_images": int(len(images)),
                "channels": int(images.shape[1]), "image_size": int(images.shape[-1]),
                "storage": "uint8" if images.dtype == torch.uint8 else "fp16", "class_names": list(class_names),
                **info,
                "bytes": {"images": files[IMAGES]["bytes"], "labels": label_bytes,
                          "hard_labels_in_images_file": int(targets.numel() * 8)},
                "files": files}
    write_text(root / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


@dataclass
class Artefact:
    root: Path
    manifest: dict[str, Any]
    images: ImageSet  # uint8, or float on the 0..255 scale for fp16 storage
    recipe_yaml: str

    @property
    def ipc(self) -> int:
        return self.manifest["ipc"]

    @property
    def label_mode(self) -> str:
        return self.manifest["label_mode"]

    @property
    def labels_root(self) -> Path | None:
        return self.root / LABELS if self.label_mode == "relabel" else None


def read_manifest(root: Path) -> dict[str, Any]:
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise ArtefactError(f"{root}: no such artefact directory")
    if not path.is_file():
        if (Path(root) / "work").is_dir():
            raise ArtefactError(f"{path}: missing: synthesis has not finished (rerun `distill synth` with the same "
                                f"recipe to resume)")
        raise ArtefactError(f"{path}: missing: {root} is not a distilled-dataset artefact")
    try:
        m = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ArtefactError(f"{path}: corrupted (not valid JSON: {err})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ArtefactError(f"{path}: not a distilled-dataset manifest (format "
                            f"{m.get('format') if isinstance(m, dict) else None!r}, want {FORMAT!r})")
    return m


def verify_files(root: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present, of its size and sha256; else an error naming the file."""
    files = manifest.get("files")
    if not isinstance(files, dict) or IMAGES not in files:
        raise ArtefactError(f"{root / MANIFEST}: corrupted (no file list with {IMAGES})")
    for rel, rec in files.items():
        path = root / rel
        if not path.is_file():
            raise ArtefactError(f"{path}: missing (listed in {root / MANIFEST})")
        size = path.stat().st_size
        if size != rec.get("bytes"):
            raise ArtefactError(f"{path}: corrupted ({size} bytes, the manifest says {rec.get('bytes')})")
        if sha256_file(path) != rec.get("sha256"):
            raise ArtefactError(f"{path}: corrupted (sha256 differs from the manifest's)")


def read_artefact(root: str | Path) -> Artefact:
    """Open and fully verify an artefact (checksums, shapes, classes)."""
    root = Path(root)
    m = read_manifest(root)
    verify_files(root, m)
    tensors, _ = load_tensors(root / IMAGES)
    images, targets = tensors.get("images"), tensors.get("targets")
    names = tuple(m["class_names"])
    n, ipc = m["num_images"], m["ipc"]
    want = (n, m["channels"], m["image_size"], m["image_size"])
    if images is None or targets is None or tuple(images.shape) != want or tuple(targets.shape) != (n,):
        raise ArtefactError(f"{root / IMAGES}: holds {({k: tuple(v.shape) for k, v in tensors.items()})}, the manifest "
                            f"says images {want} and targets ({n},)")
    if n != ipc * len(names) or not torch.equal(targets, torch.arange(len(names)).repeat_interleave(ipc)):
        raise ArtefactError(f"{root / IMAGES}: targets are not {ipc} images per class for {len(names)} classes")
    try:
        listed = json.loads((root / CLASSES).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ArtefactError(f"{root / CLASSES}: unreadable ({err})") from None
    if tuple(listed) != names:
        raise ArtefactError(f"{root / CLASSES}: class list differs from the manifest's")
    return Artefact(root, m, as_imageset(images, targets, names), (root / RECIPE).read_text())
