"""HeLlO in the synthesis pipeline (`labels.mode: projector`): after the images exist, fit a LoRA
label projector (`synth.projector`) to the teacher pool on augmented real + synthetic views, store
only its factors (+ a non-regenerable head) in the artefact's `labels/`, and let eval-synth serve
its soft labels online per augmented batch instead of replaying a stored label store.

    preflight(hc, real)             before any synthesis: builds the base encoder, refuses a base
                                    whose checksum differs from `checksum`, LoRA targets matching
                                    no module, a projector config the library rejects
    hello_step(cfg, real, ...)      at finalise: fit (+ optional image update), save, bytes accounting
    ProjectorLabels (`projector`)   the label source eval-synth serves projector artefacts with;
                                    refuses a projector whose class list, data size or base differ;
                                    also reads a projector exported as a peft adapter
                                    (`synth.peft_export`)
    projector_teacher(cfg, ...)     the same projector, same refusals, as a `distill train` pool
                                    teacher (pool.teachers: [{projector: ...}])

Bytes accounting (manifest `projector`): the projector file's bytes; the bytes of the soft-label
store it replaces (the recipe's `labels.relabel` settings), measured by writing one label epoch
with the store's own writer and multiplying by `labels.relabel.epochs` (every epoch's shards have
the same shapes, hence the same sizes); and their ratio.
"""
from __future__ import annotations

import dataclasses
import json
import struct
import time
from pathlib import Path
from typing import Any

import torch

from distill.artefacts import LABELS_DIR as LABELS
from distill.artefacts import PROJECTOR_FILE, read_metadata
from distill.augment import RandomCrops
from distill.config import CropScale, ProjectorTeacherConfig, Strict
from distill.data import ImageSet
from distill.errors import ArtefactError, ConfigError
from synth.artefact import as_imageset, quantise
from synth.config import HelloConfig, ImageOptConfig, RelabelConfig, SynthConfig
from synth.init import class_indices, gather, keyed_generator
from synth.peft_export import ADAPTER_FORMAT, adapter_metadata, load_peft_adapter
from synth.projector import (FORMAT, ProjectorConfig, ProjectorSource, apply_lora, build_encoder, build_projector,
                             fit_projector, load_projector, projector_bytes, projector_path, save_projector)
from synth.relabel import relabel_store
from teachers.labeling import LabelContext, Labeling, register_labeler
from teachers.pool import EnsemblePool
from teachers.source import OnlineLabeler, SoftLabels
from teachers.teacher import Teacher


def preflight(hc: HelloConfig, real: ImageSet):
    """Build the frozen base once and refuse a wrong checksum or dead LoRA targets before any
    synthesis compute. Returns the base (reused by `hello_step`)."""
    pcfg = hc.projector_config()
    if hc.checkpoint is not None and not Path(hc.checkpoint).is_file():
        raise ConfigError(f"labels.projector.checkpoint: {hc.checkpoint}: no such file")
    try:
        base = build_encoder(pcfg)
    except (ValueError, RuntimeError) as err:
        raise ConfigError(f"labels.projector: cannot build {hc.kind} encoder {hc.model!r}: {err}") from None
    if hc.checksum is not None and hc.checksum != base.checksum:
        raise ConfigError(f"labels.projector.checksum: base encoder {hc.model} from {hc.checkpoint} has checksum "
                          f"{base.checksum[:16]}…, the recipe expects {hc.checksum[:16]}…")
    probe = build_projector(dataclasses.replace(pcfg, head_init="random"), real.class_names, base=base)
    try:
        apply_lora(probe)  # refuses targets matching no module, by name
    except ValueError as err:
        raise ConfigError(f"labels.projector.lora_targets: {err}") from None
    finally:  # peft wraps modules in place: undo on the shared base (the wrappers carry its hooks)
        _unwrap(base.encoder)
    return base


def _unwrap(encoder: torch.nn.Module) -> None:
    """Remove injected LoRA layers from a base after a probe, restoring the original modules."""
    for name, mod in reversed(list(encoder.named_modules())):  # inner wrappers first
        if hasattr(mod, "get_base_layer") and hasattr(mod, "lora_A"):
            parent = encoder.get_submodule(name.rsplit(".", 1)[0]) if "." in name else encoder
            setattr(parent, name.rsplit(".", 1)[-1], mod.get_base_layer())


def _probe(projector, pool, x: torch.Tensor, crops, gen: torch.Generator) -> dict[str, float]:
    views = crops(x, gen)
    with torch.no_grad():
        p_t = pool.soft_labels(views).probs.float()
        p_p = projector(views).float().softmax(-1)
    return {"mse": float((p_p - p_t).pow(2).sum(-1).mean()),
            "top1_agreement": float((p_p.argmax(-1) == p_t.argmax(-1)).float().mean())}


def optimise_images(projector, pool, images01: torch.Tensor, crops, oc: ImageOptConfig,
                    gen: torch.Generator) -> torch.Tensor:
    """See `ImageOptConfig`: returns updated synthetic images in [0, 1]."""
    z = images01.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=oc.lr)
    projector.eval()
    for _ in range(oc.steps):
        idx = torch.randperm(len(z), generator=gen)[:oc.batch_size].to(z.device)
        views = crops(z[idx], gen)
        with torch.no_grad():
            p_t = pool.soft_labels(views.detach()).probs.float()
        loss = (projector(views).softmax(-1) - p_t).pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            z.clamp_(0, 1)
    return z.detach()


def replaced_label_bytes(root: Path, images, teachers, rc, seed: int, config_hash: str, device) -> dict[str, int]:
    """Bytes of the relabel store these settings would write, without labelling every epoch: label
    epoch 0 is written with the store's own writer; epoch e's shards hold the same tensors and a
    header that differs only in the digits of e (safetensors pads the header to 8 bytes)."""
    one = rc.model_copy(update={"epochs": 1})
    m = relabel_store(root, images, teachers, one, seed, config_hash, device, progress=False)
    total = 0
    for rec in m["shards"]:
        blob = (Path(root) / "shards" / rec["file"]).read_bytes()
        n = struct.unpack("<Q", blob[:8])[0]
        data, unpadded = len(blob) - 8 - n, len(blob[8:8 + n].rstrip(b" "))
        total += sum(8 + -(-(unpadded + len(str(e)) - 1) // 8) * 8 + data for e in range(rc.epochs))
    return {"one_epoch": int(m["bytes"]), "epochs": rc.epochs, "crops_per_image": rc.crops_per_image,
            "topk": m["topk"], "bytes": total}


def fit_set(seed: int, real: ImageSet, per_class: int, syn: torch.Tensor, targets: torch.Tensor,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The images a projector is fitted on: the synthetic ones + `per_class` real images per class."""
    real_x, real_y = [], []
    for c, idx in class_indices(real).items():
        pick = idx[torch.randperm(len(idx), generator=keyed_generator(seed, "hello-real", c))[:per_class]]
        real_x.append(gather(real, pick).float().div(255).to(device))
        real_y.append(torch.full((len(pick),), c, dtype=torch.long))
    return torch.cat([syn, *real_x]), torch.cat([targets.long(), *real_y]).to(device)


def hello_step(cfg: SynthConfig, real: ImageSet, teachers: list[Teacher], base, root: Path, device: torch.device,
               images01: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """Fit the projector of `cfg.labels.projector` (on `base`, from `preflight`) to `teachers` on
    the synthetic + real views, optionally update the images, save it into `root/labels/` and
    account its bytes against the store it replaces. Returns (images, the manifest's info)."""
    hc, rc = cfg.labels.projector, cfg.labels.relabel
    start = time.perf_counter()
    syn = images01.detach().float().clamp(0, 1).to(device)
    fit_x, fit_y = fit_set(cfg.seed, real, hc.real_per_class, syn, targets, device)
    pool = EnsemblePool(teachers).to(device)
    crops = RandomCrops(tuple(rc.scale), tuple(rc.ratio), rc.flip)
    proj = build_projector(hc.projector_config(), tuple(real.class_names), images=fit_x, targets=fit_y, base=base)
    proj = apply_lora(proj).to(device)
    probe_x = fit_x[torch.randperm(len(fit_x), generator=keyed_generator(cfg.seed, "hello-probe"))[:hc.probe_views]]
    before = _probe(proj, pool, probe_x, crops, keyed_generator(cfg.seed, "hello-probe-views"))
    curves = fit_projector(proj, fit_x, pool, fit_y, steps=hc.steps, lr=hc.lr, lam=hc.lam,
                           augment_fn=lambda x, g: crops(x, g), generator=keyed_generator(cfg.seed, "hello-fit"),
                           batch_size=hc.batch_size, schedule=hc.schedule)
    after = _probe(proj, pool, probe_x, crops, keyed_generator(cfg.seed, "hello-probe-views"))
    info: dict[str, Any] = {"fit": {"steps": hc.steps, "final_loss": curves["loss"][-1], "final_mse": curves["mse"][-1],
                                    "probe_before": before, "probe_after": after,
                                    "fit_images": {"synthetic": len(syn), "real": len(fit_x) - len(syn)}}}
    out = images01
    if hc.image_opt.enabled:
        out = optimise_images(proj, pool, syn, crops, hc.image_opt, keyed_generator(cfg.seed, "hello-image-opt"))
        syn_probe = _probe(proj, pool, syn, crops, keyed_generator(cfg.seed, "hello-probe-views"))
        opt_probe = _probe(proj, pool, out, crops, keyed_generator(cfg.seed, "hello-probe-views"))
        info["image_opt"] = {"steps": hc.image_opt.steps, "synthetic_before": syn_probe, "synthetic_after": opt_probe}
        out = out.cpu()
    path = save_projector(root / LABELS, proj.cpu(), meta={"data_image_size": real.image_size,
                                                           "data_channels": real.channels,
                                                           "teachers": json.dumps([t.name for t in teachers])},
                          dtype=getattr(torch, hc.store_dtype))
    pbytes = projector_bytes(path.parent)
    stored = as_imageset(quantise(out, cfg.storage), targets, tuple(real.class_names))
    rep = replaced_label_bytes(root / "work" / "hello-replaced-labels", stored, teachers, rc, cfg.seed, cfg.hash(),
                               device)
    params = sum(p.numel() for p in proj.lora_state_dict().values())
    info["projector"] = {"file": f"{LABELS}/{path.name}", "bytes": pbytes, "lora_parameters": params,
                         "head_stored": hc.head_init != "text", "base_checksum": proj.base_checksum,
                         "encoder": f"{hc.kind}:{hc.model}", "checkpoint": str(hc.checkpoint) if hc.checkpoint else None,
                         "soft_label_bytes_replaced": rep["bytes"], "replaced_store": rep,
                         "bytes_ratio": pbytes / rep["bytes"], "seconds": time.perf_counter() - start}
    info["fit"]["seconds"] = info["projector"]["seconds"]
    return out, info


class TrainableLabels:
    """A label source whose outputs may enter autograd: `ProjectorSource` answers under
    inference_mode, and the student's loss saves its targets for backward."""

    def __init__(self, source):
        self.source, self.num_classes, self.cost = source, source.num_classes, source.cost

    def soft_labels(self, images, targets=None, index=None):
        soft = self.source.soft_labels(images, targets, index)
        return SoftLabels(probs=soft.probs.clone(), logits=None if soft.logits is None else soft.logits.clone())


def _load_checked(path: Path, class_names, image_size: int, channels: int, checkpoint: str | Path | None,
                  device) -> Any:
    """The projector at `path` (a projector.safetensors, a directory holding one or its labels/, or
    a peft adapter directory `synth.peft_export` wrote), refused — ArtefactError naming it — when
    fitted for another data size, channel count or class list, or when its base (at `checkpoint`,
    default the stored one) has another checksum: its labels would be another function's."""
    try:
        path = projector_path(path)
        adapter = path.is_dir()
        meta = adapter_metadata(path) if adapter else read_metadata(path)
    except (OSError, ValueError) as err:
        raise ArtefactError(str(err)) from None
    if meta.get("format") != (ADAPTER_FORMAT if adapter else FORMAT):
        raise ArtefactError(f"{path}: not a HeLlO projector file (format {meta.get('format')!r})")
    for key, want in (("data_image_size", image_size), ("data_channels", channels)):
        if int(meta.get(key, -1)) != int(want):
            raise ArtefactError(f"{path}: fitted for {key} {meta.get(key)}, the data here has {want}")
    cfg = None
    if checkpoint is not None:
        cfg = dataclasses.replace(ProjectorConfig.from_dict(meta["config"]), checkpoint=str(checkpoint))
    try:
        if adapter:
            return load_peft_adapter(path, cfg, class_names=list(class_names), device=device)
        return load_projector(path.parent, cfg, class_names=list(class_names), device=device)
    except ValueError as err:
        raise ArtefactError(f"{path}: {err}") from None


class ProjectorOptions(Strict):
    """A fitted projector (`projector`: its `projector.safetensors`, or the peft adapter directory
    `synth.peft_export.export_peft_adapter` wrote) serving labels online on fresh RandomResizedCrops
    (the artefact's `labels.relabel` crops); `checkpoint`: this machine's copy of its base encoder
    (its checksum must match)."""

    projector: Path
    scale: CropScale = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = False
    checkpoint: Path | None = None


@register_labeler("projector")
class ProjectorLabels(Labeling):
    """HeLlO: labels from a LoRA projector, generated per view instead of replayed from a store."""

    Options = ProjectorOptions

    def load(self, class_names, image_size: int, channels: int, device) -> OnlineLabeler:
        """Refuses, naming the file, a projector fitted for another class list, data size or
        channels, or whose base has another checksum."""
        o = self.options
        if not o.projector.exists():
            raise ArtefactError(f"{o.projector}: missing (label mode 'projector')")
        proj = _load_checked(o.projector, class_names, image_size, channels, o.checkpoint, device)
        crops = RandomCrops(tuple(o.scale), tuple(o.ratio), o.flip)
        return OnlineLabeler(crops, TrainableLabels(ProjectorSource(proj)))

    def build(self, ctx: LabelContext) -> OnlineLabeler:
        return self.load(ctx.train.class_names, ctx.train.image_size, ctx.train.channels, ctx.device)

    def describe(self, run) -> str:
        return f"HeLlO projector {self.options.projector}"


def projector_labeler(art, rc: RelabelConfig, device, checkpoint: str | Path | None = None):
    """(eval-synth's labeler for a projector artefact, the projector's bytes): the `projector`
    label source on the artefact's projector, crops of its `labels.relabel` settings."""
    root = Path(art.root) / LABELS
    opts = ProjectorOptions(projector=root / PROJECTOR_FILE, scale=rc.scale, ratio=rc.ratio, flip=rc.flip,
                            checkpoint=checkpoint)
    m = art.manifest
    labeler = ProjectorLabels(opts).load(m["class_names"], m["image_size"], m["channels"], device)
    return labeler, projector_bytes(root)


class ProjectorClassifier(torch.nn.Module):
    """A projector shaped like `distill.models.ImageClassifier` for `teachers.Teacher`: [0, 1]
    images at data size → logits, with `num_classes`, `class_names`, `metadata()`; `net.embed`
    gives the pool its (normalised encoder) features when it fits heads for *other* teachers."""

    def __init__(self, projector, path: Path, channels: int, image_size: int):
        super().__init__()
        self.projector, self.path, self.in_chans, self.input_size = projector, Path(path), channels, image_size
        self.arch = f"hello_projector:{projector.cfg.model_name}"

    @property
    def num_classes(self) -> int:
        return self.projector.num_classes

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.projector.class_names)

    @property
    def net(self) -> "ProjectorClassifier":  # teachers.pool.teacher_features: preprocess → net.embed
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        return images  # the projector does its own (grey → RGB, resize, mean/std)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector.features(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.projector(images).float()

    def metadata(self) -> dict[str, Any]:
        p = self.projector
        return {"format": "distill.projector/1", "kind": "hello_projector", "model": self.arch,
                "num_classes": self.num_classes, "in_chans": self.in_chans, "input_size": self.input_size,
                "encoder_input_size": p.encoder.input_size, "mean": list(p.encoder.mean), "std": list(p.encoder.std),
                "class_names": list(self.class_names), "projector": str(self.path), "base_checksum": p.base_checksum,
                "checkpoint": p.cfg.checkpoint}


def projector_teacher(cfg: ProjectorTeacherConfig, class_names, image_size: int, channels: int,
                      device="cpu") -> Teacher:
    """A pool teacher (`teachers.Teacher`) serving a projector's logits to `distill train`
    (`pool.teachers: [{projector: ...}]`, distill.config.ProjectorTeacherConfig), with the same
    refusals as eval-synth: another class list, data size, channel count or base is an ArtefactError."""
    proj = _load_checked(Path(cfg.projector), class_names, image_size, channels, cfg.checkpoint, device)
    return Teacher(cfg.display_name, ProjectorClassifier(proj, cfg.projector, channels, image_size))
