"""HeLlO label projector (Yu et al., "Heavy Labels Out!", arXiv 2408.08201): instead of storing soft
labels per image per augmentation, store LoRA factors that turn a frozen foundation encoder plus a
linear head into an image→label generator that mimics the teacher online.

From the paper: frozen CLIP image tower + linear head initialised from CLIP text embeddings of the
class prompts (free to store), LoRA on the encoder *and* the head, loss MSE(f(x), y_t) + λ·CE(f(x), y),
only the LoRA factors stored. Ours (no public code): MSE on probabilities summed over classes, LoRA
B=0 init (the untrained projector *is* zero-shot CLIP), prototype/random heads, timm and engine
(`distill train` checkpoint) encoders, a cosine fit schedule, fp16 storage,
the on-disk format and its refusals. open_clip, timm and peft are imported at their seam only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import re
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from distill.artefacts import ADAPTER_CONFIG, ADAPTER_META, LABELS_DIR, PROJECTOR_FILE, find_projector
from distill.models import CHECKPOINT_FORMAT, create_model, read_checkpoint_header
from teachers.source import LabelSource, QueryCost, SoftLabels

KINDS = ("open_clip", "timm", "engine")  # engine: a classifier checkpoint this engine wrote (e.g. a teacher's)
HEAD_INITS = ("text", "prototype", "random")
OPEN_CLIP_TARGETS = ("attn", "c_fc", "c_proj")  # "attn" = peft's MultiheadAttention wrapper (qkv + out_proj)
# timm ViT blocks (exact, so the patch-embed `proj` conv is not caught), ResNet stage convs,
# EfficientNet/MobileNet pointwise convs (never depthwise: grouped convs), ConvNeXt block MLPs.
TIMM_TARGETS = r".*(blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))|layer\d+\.\d+\.conv\d|blocks\.\d+\.\d+\.conv_pwl?)"
FILE = PROJECTOR_FILE
FORMAT = "distill.projector/1"
_LORA_FIELDS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


@dataclass(frozen=True)
class ProjectorConfig:
    """What defines a projector; stored beside its LoRA factors. `None` fields resolve from the
    encoder (input size, mean/std: the model's own preprocessing; head_scale: CLIP's logit scale,
    16 for timm) or, for `lora_targets`, to the per-kind defaults above."""

    kind: str = "open_clip"
    model_name: str = "ViT-B-32"
    checkpoint: str | None = None  # local .safetensors / .pt; None = deterministic random init (seed 0)
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | str | None = None  # names (suffix match) or one full-match regex
    head_init: str = "text"
    template: str = "a photo of a {}."
    head_scale: float | None = None
    input_size: int | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    normalize_features: bool = True  # cosine classifier: CLIP's zero-shot geometry

    def __post_init__(self) -> None:
        if self.kind not in KINDS or self.head_init not in HEAD_INITS:
            raise ValueError(f"kind {self.kind!r} / head_init {self.head_init!r}; allowed: {KINDS} / {HEAD_INITS}")
        if self.head_init == "text" and self.kind != "open_clip":
            raise ValueError("head_init 'text' needs a CLIP text tower: use kind 'open_clip'")
        if self.kind == "engine" and not self.checkpoint:
            raise ValueError("kind 'engine' needs the checkpoint (an engine safetensors file) it is read from")
        if self.lora_rank < 1 or not 0.0 <= self.lora_dropout < 1.0 or "{}" not in self.template \
                or (self.head_scale is not None and self.head_scale <= 0):
            raise ValueError("need lora_rank >= 1, 0 <= lora_dropout < 1, '{}' in template, head_scale > 0")
        targets = self.lora_targets
        if targets is None:
            targets = OPEN_CLIP_TARGETS if self.kind == "open_clip" else TIMM_TARGETS
        targets = targets if isinstance(targets, str) else tuple(targets)
        if self.kind == "open_clip" and re.search(r"out_proj", str(targets)):
            raise ValueError("LoRA target 'out_proj' never gets a gradient in open_clip (attention reads "
                             "out_proj.weight directly); target 'attn', which covers it")
        object.__setattr__(self, "lora_targets", targets)
        for f in ("mean", "std"):
            if getattr(self, f) is not None:
                object.__setattr__(self, f, tuple(float(v) for v in getattr(self, f)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProjectorConfig":
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown ProjectorConfig keys {sorted(unknown)}")
        d = dict(d)
        if isinstance(d.get("lora_targets"), list):
            d["lora_targets"] = tuple(d["lora_targets"])
        return cls(**d)


class ImageEncoder(nn.Module):
    """Frozen image tower: normalised pixels at `input_size` → features [B, dim]. Carries its
    resolved preprocessing so the projector can adapt data-sized [0, 1] images."""

    def __init__(self, body: nn.Module, input_size: int, mean: Sequence[float], std: Sequence[float],
                 in_chans: int = 3):
        super().__init__()
        self.body, self.input_size, self.in_chans = body, int(input_size), int(in_chans)
        self.mean, self.std = tuple(mean), tuple(std)
        if len(self.mean) != in_chans or len(self.std) != in_chans:
            raise ValueError(f"mean/std need {in_chans} values, got {self.mean} / {self.std}")
        try:
            with torch.no_grad():
                self.dim = int(body(torch.zeros(1, in_chans, input_size, input_size)).shape[-1])
        except RuntimeError as e:
            raise ValueError(f"encoder cannot take input_size {input_size}: {e}") from e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Base(NamedTuple):
    encoder: ImageEncoder
    checksum: str  # sha256 of the whole base model (open_clip: both towers, the text head depends on it)
    clip: nn.Module | None  # full open_clip model for text heads; None for timm
    tokenizer: Callable | None


def state_checksum(module: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state-dict tensor, sorted by name."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def build_encoder(cfg: ProjectorConfig) -> Base:
    """Frozen base from a local checkpoint (never a download); random init is seeded so the
    checksum of a checkpoint-less base is reproducible (tests, demos)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if cfg.kind == "open_clip":
            import open_clip  # heavy, optional: open_clip encoders only
            model = open_clip.create_model(cfg.model_name, pretrained=None)
            if cfg.checkpoint:
                _load_open_clip(open_clip, model, cfg)
            body, tok = model.visual, open_clip.get_tokenizer(cfg.model_name)
            size = model.visual.image_size
            pre = getattr(model.visual, "preprocess_cfg", {}) or {}
            mean = pre.get("mean", open_clip.OPENAI_DATASET_MEAN)
            std = pre.get("std", open_clip.OPENAI_DATASET_STD)
        elif cfg.kind == "engine":
            model, body, tok, size, mean, std = _engine_classifier(cfg)
        else:
            import timm  # heavy (imports torchvision): loaded when a model is named
            overlay = {"file": str(cfg.checkpoint)} if cfg.checkpoint else None
            model = timm.create_model(cfg.model_name, pretrained=bool(cfg.checkpoint),
                                      pretrained_cfg_overlay=overlay, num_classes=0)
            body, tok = model, None
            size, mean, std = (model.pretrained_cfg[k] for k in ("input_size", "mean", "std"))
    model.eval().requires_grad_(False)
    size = cfg.input_size or (size if isinstance(size, int) else size[-1])
    mean, std = cfg.mean or mean, cfg.std or std
    enc = ImageEncoder(body, size, mean, std, in_chans=len(mean))
    return Base(enc, state_checksum(model), model if cfg.kind == "open_clip" else None, tok)


def _load_open_clip(open_clip, model: nn.Module, cfg: ProjectorConfig) -> None:
    """open_clip's own loader (key remapping, weights_only=True). OpenAI's original `.pt` files are
    TorchScript archives, which would run their code: refused, saying how to convert them."""
    path = Path(cfg.checkpoint)
    if zipfile.is_zipfile(path) and any("/code/" in n for n in zipfile.ZipFile(path).namelist()):
        raise ValueError(f"{path} is a TorchScript archive (OpenAI's original CLIP format), which is not loaded here "
                         f"(it runs its own code); where you trust it, convert it once: "
                         f"open_clip.create_model('{cfg.model_name.removesuffix('-quickgelu')}-quickgelu', "
                         f"pretrained='{path}') and save model.state_dict() with safetensors; then use model "
                         f"'{cfg.model_name.removesuffix('-quickgelu')}-quickgelu' (OpenAI's weights were trained "
                         f"with QuickGELU)")
    try:
        open_clip.load_checkpoint(model, str(path), strict=True, weights_only=True)
    except (RuntimeError, KeyError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path}: open_clip cannot load it into {cfg.model_name!r} ({str(err).splitlines()[0][:200]}); "
                         f"check the model name (OpenAI-trained weights need the '-quickgelu' variant)") from None


def _engine_classifier(cfg: ProjectorConfig):
    """An engine checkpoint (e.g. a teacher trained on other data): its timm network without the
    classifier, with the preprocessing its metadata records."""
    meta = read_checkpoint_header(cfg.checkpoint)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{cfg.checkpoint}: not a checkpoint this engine wrote (kind 'engine')")
    clf = create_model(cfg.model_name, meta["num_classes"], meta["in_chans"], meta["input_size"],
                       tuple(meta["class_names"]), checkpoint=cfg.checkpoint)
    if not hasattr(clf.net, "reset_classifier"):
        raise ValueError(f"kind 'engine': {cfg.model_name} has no reset_classifier; use a timm architecture")
    clf.net.reset_classifier(0)
    return clf, clf.net, None, clf.input_size, clf.mean.flatten().tolist(), clf.std.flatten().tolist()


def _linear(weight: torch.Tensor) -> nn.Linear:
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head


def text_head(clip_model: nn.Module, tokenizer: Callable, class_names: Sequence[str], template: str,
              scale: float | None = None) -> nn.Linear:
    """Rows = normalised prompt embeddings × CLIP's logit scale, so head(normalised image features)
    equals CLIP zero-shot logits; costs nothing to store (regenerated from class names)."""
    device = next(clip_model.parameters()).device
    with torch.no_grad():
        text = clip_model.encode_text(tokenizer([template.format(c) for c in class_names]).to(device), normalize=True)
        scale = clip_model.logit_scale.exp().item() if scale is None else scale
        return _linear(text.float().cpu() * scale)


def prototype_head(features: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, targets: torch.Tensor,
                   num_classes: int, scale: float, batch_size: int = 256) -> nn.Linear:
    """Rows = normalised mean feature per class × scale (nearest-class-mean classifier); needs the
    images, so it is stored with the projector rather than regenerated."""
    with torch.no_grad():
        feats = torch.cat([features(images[i:i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)])
    targets = targets.cpu().long()
    counts = torch.bincount(targets, minlength=num_classes)
    if (counts == 0).any():
        raise ValueError(f"prototype head: no images for classes {(counts == 0).nonzero().flatten().tolist()}")
    sums = torch.zeros(num_classes, feats.shape[1]).index_add_(0, targets, feats)
    return _linear(F.normalize(sums / counts[:, None], dim=1) * scale)


def random_head(dim: int, num_classes: int, scale: float, seed: int = 0) -> nn.Linear:
    """Random unit rows × scale; stored, since RNG streams are not guaranteed across versions/devices."""
    g = torch.Generator().manual_seed(seed)
    return _linear(F.normalize(torch.randn(num_classes, dim, generator=g), dim=1) * scale)


class Projector(nn.Module):
    """[0, 1] images at data size → logits: grey↔RGB as the encoder needs, resize to its size, mean/std,
    frozen encoder, L2-normalise, head. Differentiable in the images (the paper's image update)."""

    def __init__(self, encoder: ImageEncoder, head: nn.Linear, cfg: ProjectorConfig,
                 class_names: Sequence[str], base_checksum: str):
        super().__init__()
        self.encoder, self.head, self.cfg = encoder, head, cfg
        self.class_names, self.base_checksum = list(class_names), base_checksum
        self.register_buffer("mean", torch.tensor(encoder.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(encoder.std).view(1, -1, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train(self, mode: bool = True) -> "Projector":
        """BatchNorm stays in eval: running stats are base buffers, covered by the checksum, not stored."""
        super().train(mode)
        for m in self.encoder.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x, c = images.to(self.mean.device, self.mean.dtype), self.encoder.in_chans
        if x.shape[1] != c:
            if x.shape[1] == 1:
                x = x.expand(-1, c, -1, -1)
            elif c == 1 and x.shape[1] == 3:
                x = x.mean(1, keepdim=True)
            else:
                raise ValueError(f"images have {x.shape[1]} channels; the encoder takes {c} (or grey)")
        s = self.encoder.input_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        f = self.encoder((x - self.mean) / self.std)
        return F.normalize(f, dim=-1) if self.cfg.normalize_features else f

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if "lora_" in n}


def build_projector(cfg: ProjectorConfig, class_names: Sequence[str], images: torch.Tensor | None = None,
                    targets: torch.Tensor | None = None, base: Base | None = None,
                    head: nn.Linear | None = None) -> Projector:
    """Base encoder + initialised head (or the given one), no LoRA yet (call `apply_lora`);
    `images`/`targets` only for prototype heads."""
    base = base or build_encoder(cfg)
    scale = cfg.head_scale or (base.clip.logit_scale.exp().item() if base.clip is not None else 16.0)
    if head is not None:
        return Projector(base.encoder, head, cfg, class_names, base.checksum).requires_grad_(False).eval()
    if cfg.head_init == "text":
        head = text_head(base.clip, base.tokenizer, class_names, cfg.template, cfg.head_scale)
    else:
        head = random_head(base.encoder.dim, len(class_names), scale)
    proj = Projector(base.encoder, head, cfg, class_names, base.checksum)
    if cfg.head_init == "prototype":
        if images is None or targets is None:
            raise ValueError("head_init 'prototype' needs images and targets")
        proj.head = prototype_head(proj.features, images, targets, len(class_names), scale)
    return proj.requires_grad_(False).eval()


def apply_lora(projector: Projector, cfg: ProjectorConfig | None = None) -> Projector:
    """peft LoRA on the encoder's targets and on the head (as the paper does); everything else
    frozen. `cfg` may change only the LoRA fields of `projector.cfg`."""
    from peft import inject_adapter_in_model  # heavy: LoRA only

    cfg = cfg or projector.cfg
    if dataclasses.replace(cfg, **{f: getattr(projector.cfg, f) for f in _LORA_FIELDS}) != projector.cfg:
        raise ValueError("apply_lora: cfg differs from the projector's in non-LoRA fields")
    if projector.lora_state_dict():
        raise ValueError("apply_lora: projector already has LoRA factors")
    lora = lora_config(projector, cfg)
    projector.requires_grad_(False)
    inject_adapter_in_model(lora, projector)
    for n, p in projector.named_parameters():
        p.requires_grad_("lora_" in n)
    _pin_attention_bases(projector)
    projector.cfg = cfg
    return projector


def lora_config(projector: Projector, cfg: ProjectorConfig | None = None):
    """peft's `LoraConfig` for `cfg`'s LoRA fields (default: the projector's) on this projector's
    modules: the encoder's targets (`encoder.body.` + name) and the head. Refuses targets that
    match no module, naming some that exist."""
    from peft import LoraConfig  # heavy: LoRA only

    cfg = cfg or projector.cfg
    t = cfg.lora_targets
    names = t if isinstance(t, str) else rf"(?:.*\.)?(?:{'|'.join(map(re.escape, t))})"  # list = suffix match
    enc = rf"encoder\.body\.(?:{names})"
    if not any(re.fullmatch(enc, n) for n, _ in projector.named_modules()):
        some = [n[len("encoder.body."):] for n, m in projector.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d, nn.MultiheadAttention)) and n.startswith("encoder.body.")][:6]
        raise ValueError(f"LoRA targets {t!r} match no module of {cfg.model_name}; modules include {some}")
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=rf"(?:{enc})|head", bias="none")


def _pin_attention_bases(projector: nn.Module) -> None:
    """peft's MultiheadAttention LoRA merges ΔW into the base before each forward and subtracts it
    after; (W+ΔW)−ΔW ≠ W in floating point, so the frozen base drifts on every call (measured: ~1 ulp
    per forward in fp32, 1e-3 relative after 20 forwards in fp16) and reloaded projectors disagree.
    merge builds a new tensor and leaves W untouched, so put the exact original back after forward.
    Also seen in peft 0.21.2: that merge adds out_proj's ΔW twice (W + 2ΔW); harmless (a rescaling,
    same in training and serving) but version-bound, hence the peft version in the metadata."""
    from peft.tuners.lora.layer import MultiheadAttention  # heavy: LoRA only

    def keep(mod: nn.Module, args: Any) -> None:
        mha = mod.get_base_layer()
        mod._pinned = (mha.in_proj_weight.data, mha.out_proj.get_base_layer().weight.data)

    def restore(mod: nn.Module, args: Any, out: Any) -> None:
        mha = mod.get_base_layer()
        mha.in_proj_weight.data, mha.out_proj.get_base_layer().weight.data = mod._pinned
        del mod._pinned

    for m in projector.modules():
        if isinstance(m, MultiheadAttention):
            m.register_forward_pre_hook(keep)
            m.register_forward_hook(restore, always_call=True)


def projector_loss(logits: torch.Tensor, teacher_probs: torch.Tensor, targets: torch.Tensor | None,
                   lam: float) -> dict[str, torch.Tensor]:
    """MSE on *probabilities* (what is served; logits are only defined up to a per-row shift and
    their far tail would dominate), summed over classes so its weight does not shrink with C;
    plus λ·CE on the hard label."""
    mse = (logits.softmax(-1) - teacher_probs).pow(2).sum(-1).mean()
    ce = F.cross_entropy(logits, targets) if targets is not None and lam > 0 else logits.new_zeros(())
    return {"loss": mse + lam * ce, "mse": mse, "ce": ce}


def fit_projector(projector: Projector, images: torch.Tensor, teacher_probs: torch.Tensor | LabelSource,
                  targets: torch.Tensor | None, steps: int = 200, lr: float = 1e-3, lam: float = 0.1,
                  augment_fn: Callable[[torch.Tensor, torch.Generator | None], torch.Tensor] | None = None,
                  generator: torch.Generator | None = None, batch_size: int = 64,
                  weight_decay: float = 0.0, schedule: str = "cosine") -> dict[str, list[float]]:
    """AdamW on the LoRA factors, lr constant or cosine-decayed to 0 over `steps` (a constant lr
    high enough to fit fast leaves the loss noisy at the end). `teacher_probs` is either [N, C]
    fixed labels (then `augment_fn` must keep labels) or a LabelSource that relabels every
    augmented view online (the paper's setting: mimic the teacher under the augmentations
    students will see)."""
    params = [p for p in projector.parameters() if p.requires_grad]
    if not params:
        raise ValueError("fit_projector: no trainable parameters; call apply_lora first")
    device = projector.mean.device
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule {schedule!r}; allowed: constant, cosine")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if schedule == "cosine" else None
    curves: dict[str, list[float]] = {"loss": [], "mse": [], "ce": []}
    projector.train()
    for _ in range(steps):
        idx = torch.randperm(len(images), generator=generator)[:batch_size]
        x = images[idx.to(images.device)].to(device)
        y = targets[idx.to(targets.device)].to(device) if targets is not None else None
        if augment_fn is not None:
            x = augment_fn(x, generator)
        if isinstance(teacher_probs, torch.Tensor):
            p_t = teacher_probs[idx.to(teacher_probs.device)].to(device)
        else:
            p_t = teacher_probs.soft_labels(x, targets=y).probs.to(device)
        terms = projector_loss(projector(x), p_t.float(), y, lam)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        opt.step()
        if sched is not None:
            sched.step()
        for k, v in terms.items():
            curves[k].append(float(v.detach()))
    projector.eval()
    return curves


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_projector(path_dir: str | Path, projector: Projector, meta: dict[str, str] | None = None,
                   dtype: torch.dtype = torch.float32) -> Path:
    """One safetensors file: LoRA factors (+ the head if not text-initialised: not regenerable
    without the images/RNG) and metadata describing the base, classes and config. A lower-precision
    `dtype` (fp16 halves the bytes) first rounds the projector's own tensors in place, so the
    projector in memory serves exactly the labels the stored one will."""
    import peft

    lora = projector.lora_state_dict()
    if not lora:
        raise ValueError("save_projector: no LoRA factors (call apply_lora)")
    stored = dict(lora)
    if projector.cfg.head_init != "text":
        stored["head.weight"] = getattr(projector.head, "base_layer", projector.head).weight
    with torch.no_grad():
        for p in stored.values():
            p.copy_(p.to(dtype))
    tensors = {n: p.detach().to(dtype).cpu().contiguous() for n, p in stored.items()}
    info = {"format": FORMAT, "config": json.dumps(dataclasses.asdict(projector.cfg)),
            "class_names": json.dumps(projector.class_names), "base_checksum": projector.base_checksum,
            "input_size": str(projector.encoder.input_size), "encoder": projector.cfg.model_name,
            "head_init": projector.cfg.head_init, "rank": str(projector.cfg.lora_rank),
            "versions": json.dumps({"torch": torch.__version__, "peft": peft.__version__})}
    clash = set(meta or {}) & set(info)
    if clash:
        raise ValueError(f"save_projector: meta keys {sorted(clash)} are reserved")
    path_dir = Path(path_dir)
    path_dir.mkdir(parents=True, exist_ok=True)
    _atomic_save(tensors, path_dir / FILE, {**info, **{k: str(v) for k, v in (meta or {}).items()}})
    return path_dir / FILE


def load_projector(path_dir: str | Path, cfg: ProjectorConfig | None = None,
                   class_names: Sequence[str] | None = None, device: str | torch.device = "cpu") -> Projector:
    """Rebuild the base from `cfg` (default: the stored one; pass one to point at this machine's
    checkpoint), regenerate a text head, load the factors. Refuses a different class list, input
    size, base checksum or config rather than serve labels from another function. (A projector
    exported as a peft adapter: `synth.peft_export.load_peft_adapter`.)"""
    with safe_open(str(Path(path_dir) / FILE), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    proj = apply_lora(rebuild_base(meta, tensors.pop("head.weight", None), cfg, class_names))
    lora = proj.lora_state_dict()
    if set(lora) != set(tensors):
        raise ValueError(f"stored factors do not match the LoRA layout: {sorted(set(lora) ^ set(tensors))[:6]}")
    with torch.no_grad():
        for n, p in lora.items():
            p.copy_(tensors[n])
    return proj.to(device).eval()


def rebuild_base(meta: dict[str, str], head: torch.Tensor | None, cfg: ProjectorConfig | None = None,
                 class_names: Sequence[str] | None = None) -> Projector:
    """The projector a stored one was fitted from, without LoRA: its base rebuilt from `cfg`
    (default: the stored one), its head regenerated (text) or `head` (the stored weight). `meta`:
    the stored metadata (`save_projector`'s keys, string values). Refuses a different class list,
    input size, base checksum or config."""
    stored_cfg, stored_classes = ProjectorConfig.from_dict(json.loads(meta["config"])), json.loads(meta["class_names"])
    if class_names is not None and list(class_names) != stored_classes:
        raise ValueError(f"class list mismatch: stored {stored_classes}, given {list(class_names)}")
    cfg = cfg or stored_cfg
    if cfg.input_size is not None and cfg.input_size != int(meta["input_size"]):
        raise ValueError(f"input size mismatch: stored {meta['input_size']}, given {cfg.input_size}")
    skip = {"checkpoint", "input_size", "lora_dropout"}
    diff = [f.name for f in dataclasses.fields(cfg)
            if f.name not in skip and getattr(cfg, f.name) != getattr(stored_cfg, f.name)]
    if diff:
        raise ValueError(f"config mismatch in {diff}")
    if (head is None) != (cfg.head_init == "text"):
        raise ValueError(f"head_init {cfg.head_init!r} {'stores' if head is None else 'regenerates'} its head, "
                         f"but the head weight is {'missing' if head is None else 'stored'}")
    import peft
    if json.loads(meta["versions"])["peft"] != peft.__version__:  # peft's MHA LoRA semantics may change (see pin)
        warnings.warn(f"projector saved with peft {json.loads(meta['versions'])['peft']}, loading with {peft.__version__}")
    base = build_encoder(cfg)
    if base.encoder.input_size != int(meta["input_size"]):
        raise ValueError(f"input size mismatch: stored {meta['input_size']}, given {base.encoder.input_size}")
    if base.checksum != meta["base_checksum"]:
        raise ValueError(f"base encoder checksum mismatch: stored {meta['base_checksum'][:12]}…, "
                         f"{cfg.model_name} from {cfg.checkpoint} is {base.checksum[:12]}…")
    return build_projector(cfg, stored_classes, base=base, head=None if head is None else _linear(head.float()))


def projector_path(path: str | Path) -> Path:
    """Where the projector at `path` is: a peft adapter directory (`synth.peft_export`: peft's
    ADAPTER_CONFIG + ADAPTER_META; either file names it too) as is; else a file as is, or the
    projector.safetensors in the directory `path` or in its labels/."""
    found = find_projector(path)
    if found is not None:
        return found
    p = Path(path)
    raise FileNotFoundError(f"{p}: no HeLlO projector here: give a {FILE} file, a directory holding one (or its "
                            f"{LABELS_DIR}/), or a peft adapter directory ({ADAPTER_CONFIG} + {ADAPTER_META})")


def projector_bytes(path_dir: str | Path) -> int:
    """Bytes on disk of what a projector stores (the one safetensors file: 8-byte header length +
    JSON header with metadata + raw tensors)."""
    return (Path(path_dir) / FILE).stat().st_size


class ProjectorSource:
    """Serves softmax(projector(x)) as soft labels; counts images and seconds like any teacher."""

    def __init__(self, projector: Projector, name: str = "projector"):
        self.projector, self.name = projector.eval(), name
        self.num_classes, self.cost = projector.num_classes, QueryCost()

    def soft_labels(self, images: torch.Tensor, targets: torch.Tensor | None = None,
                    index: torch.Tensor | None = None) -> SoftLabels:
        start = time.perf_counter()
        self.projector.eval()
        with torch.inference_mode():
            logits = self.projector(images).float()
            probs = logits.softmax(-1)
        if probs.is_cuda:
            torch.cuda.synchronize(probs.device)
        self.cost.add(self.name, len(images), time.perf_counter() - start)
        return SoftLabels(probs=probs.to(images.device), logits=logits.to(images.device))
