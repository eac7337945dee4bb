"""HeLlO projector on a tiny offline open_clip model (and a timm CNN/ViT): zero-shot head, LoRA
gradients, fitting, save/load round trip, refusals, byte accounting."""
from __future__ import annotations

import dataclasses
import json
import struct

import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("peft")

from synth.projector import (FILE, ProjectorConfig, ProjectorSource, apply_lora, build_encoder, build_projector,
                             fit_projector, load_projector, projector_bytes, save_projector)
from teachers.source import LabelSource

CLASSES = ["cat", "dog", "car", "ship", "tree"]
TINY = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory) -> ProjectorConfig:
    d = tmp_path_factory.mktemp("clip")
    (d / "tinyclip_test.json").write_text(json.dumps(TINY))
    open_clip.add_model_config(str(d / "tinyclip_test.json"))
    torch.manual_seed(1)
    model = open_clip.create_model("tinyclip_test", pretrained=None)
    torch.save(model.state_dict(), d / "tiny.pt")
    return ProjectorConfig(kind="open_clip", model_name="tinyclip_test", checkpoint=str(d / "tiny.pt"), lora_rank=4)


def data(n: int = 32, channels: int = 1, size: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, size, size, generator=g), torch.arange(n) % len(CLASSES)


def teacher_probs(images: torch.Tensor) -> torch.Tensor:
    w = torch.randn(images[0].numel(), len(CLASSES), generator=torch.Generator().manual_seed(3))
    return (images.flatten(1) @ w / 3).softmax(-1)


def lora_projector(cfg: ProjectorConfig):
    return apply_lora(build_projector(cfg, CLASSES))


def test_text_head_is_clip_zero_shot(tiny_cfg):
    proj = build_projector(tiny_cfg, CLASSES)
    x, _ = data(8, channels=3, size=32)
    model = open_clip.create_model("tinyclip_test", pretrained=None)
    open_clip.load_checkpoint(model, tiny_cfg.checkpoint)
    model.eval()
    tok = open_clip.get_tokenizer("tinyclip_test")
    with torch.no_grad():
        mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
        img = F.normalize(model.encode_image((x - mean[:, None, None]) / std[:, None, None]), dim=-1)
        txt = F.normalize(model.encode_text(tok([f"a photo of a {c}." for c in CLASSES])), dim=-1)
        expected = model.logit_scale.exp() * img @ txt.T
        torch.testing.assert_close(proj(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lora_projector(tiny_cfg)(x), expected, rtol=1e-4, atol=1e-4)  # B=0 init


def test_every_lora_factor_gets_gradient(tiny_cfg):
    proj = lora_projector(tiny_cfg).train()
    lora = proj.lora_state_dict()
    assert any(n.startswith("head.") for n in lora) and any(".attn." in n for n in lora)
    assert all(p.requires_grad == (n in lora) for n, p in proj.named_parameters())
    x, y = data(16)
    x.requires_grad_(True)
    F.cross_entropy(proj(x), y).backward()
    assert x.grad.abs().sum() > 0  # images can be optimised through the projector
    # B starts at 0, so A's gradient is exactly 0 on the first step; after one update every factor must move.
    assert all(p.grad.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)
    torch.optim.SGD(lora.values(), lr=0.1).step()
    proj.zero_grad()
    F.cross_entropy(proj(x), y).backward()
    dead = [n for n, p in lora.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


@pytest.fixture(scope="module")
def fitted(tiny_cfg):
    proj = lora_projector(tiny_cfg)
    x, y = data(16)
    curves = fit_projector(proj, x, teacher_probs(x), y, steps=10, lr=2e-2, lam=0.1, batch_size=16,
                           generator=torch.Generator().manual_seed(0))
    return proj, curves, x


def test_fit_reduces_loss_and_source_serves(fitted):
    proj, curves, x = fitted
    assert set(curves) == {"loss", "mse", "ce"} and len(curves["mse"]) == 10
    assert sum(curves["mse"][-3:]) / 3 < 0.7 * curves["mse"][0], curves["mse"]
    src = ProjectorSource(proj)
    assert isinstance(src, LabelSource)
    out = src.soft_labels(x[:10])
    assert out.probs.shape == (10, len(CLASSES)) and torch.allclose(out.probs.sum(-1), torch.ones(10))
    assert src.cost.total_queries == 10


def test_save_load_identical_and_bytes(fitted, tiny_cfg, tmp_path):
    proj, _, x = fitted
    save_projector(tmp_path, proj, {"note": "test"})
    back = load_projector(tmp_path, class_names=CLASSES)
    # peft merges/unmerges MHA LoRA around each forward; the pinned base must be bit-identical after fit + serving.
    live = proj.encoder.body.transformer.resblocks[0].attn.get_base_layer()
    fresh = build_encoder(tiny_cfg).encoder.body.transformer.resblocks[0].attn
    assert torch.equal(live.in_proj_weight, fresh.in_proj_weight)
    assert torch.equal(live.out_proj.get_base_layer().weight, fresh.out_proj.weight)
    assert torch.equal(ProjectorSource(proj).soft_labels(x).probs, ProjectorSource(back).soft_labels(x).probs)
    # Bytes: safetensors = 8-byte little-endian header length + JSON header (tensor index + metadata) + raw tensors.
    lora = proj.lora_state_dict()
    tensor_bytes = sum(p.numel() * p.element_size() for p in lora.values())
    header = struct.unpack("<Q", (tmp_path / FILE).read_bytes()[:8])[0]
    assert projector_bytes(tmp_path) == 8 + header + tensor_bytes
    print(f"\nLoRA params {sum(p.numel() for p in lora.values())}, tensor bytes {tensor_bytes}, "
          f"header {8 + header}, file {projector_bytes(tmp_path)}")


def test_load_refuses_by_name(tiny_cfg, tmp_path):
    save_projector(tmp_path, lora_projector(tiny_cfg))
    with pytest.raises(ValueError, match="class list mismatch"):
        load_projector(tmp_path, class_names=CLASSES[::-1])
    with pytest.raises(ValueError, match="input size mismatch"):
        load_projector(tmp_path, cfg=dataclasses.replace(tiny_cfg, input_size=48))
    other = tmp_path / "other.pt"
    sd = torch.load(tiny_cfg.checkpoint, weights_only=True)
    sd["visual.ln_post.weight"] = sd["visual.ln_post.weight"] + 0.01
    torch.save(sd, other)
    with pytest.raises(ValueError, match="base encoder checksum mismatch"):
        load_projector(tmp_path, cfg=dataclasses.replace(tiny_cfg, checkpoint=str(other)))


def test_bad_targets_raise(tiny_cfg):
    with pytest.raises(ValueError, match="no_such_layer"):
        apply_lora(build_projector(dataclasses.replace(tiny_cfg, lora_targets=("no_such_layer",)), CLASSES))
    with pytest.raises(ValueError, match="out_proj"):
        dataclasses.replace(tiny_cfg, lora_targets=("out_proj",))


def test_timm_cnn_builds_fits_and_reloads(tmp_path):
    timm = pytest.importorskip("timm")
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ckpt = tmp_path / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet", num_classes=10).state_dict().items()},
              str(ckpt))
    cfg = ProjectorConfig(kind="timm", model_name="test_resnet", checkpoint=str(ckpt), head_init="prototype",
                          input_size=32, lora_rank=2)
    x, y = data(20, channels=3, size=24)
    proj = apply_lora(build_projector(cfg, CLASSES, images=x, targets=y))
    assert any(".layer" in n for n in proj.lora_state_dict())
    curves = fit_projector(proj, x, teacher_probs(x), y, steps=6, lr=2e-2, batch_size=20,
                           generator=torch.Generator().manual_seed(0))
    assert curves["mse"][-1] < curves["mse"][0]
    save_projector(tmp_path / "p", proj)
    back = load_projector(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(proj.eval()(x), back(x))


def test_timm_vit_targets_exact():
    pytest.importorskip("timm")
    cfg = ProjectorConfig(kind="timm", model_name="test_vit", head_init="random", lora_rank=2)
    proj = apply_lora(build_projector(cfg, CLASSES))
    wrapped = {n.split(".lora_")[0] for n in proj.lora_state_dict()}
    assert "encoder.body.patch_embed.proj" not in wrapped and "head" in wrapped
    assert {w.rsplit(".", 1)[-1] for w in wrapped if w != "head"} == {"qkv", "proj", "fc1", "fc2"}


def test_fp16_storage_halves_bytes_and_serves_what_it_stores(fitted, tmp_path):
    _, _, x = fitted
    save_projector(tmp_path / "f32", fitted[0])
    proj = load_projector(tmp_path / "f32", class_names=CLASSES)  # a copy: fp16 saving rounds it in place
    before = ProjectorSource(proj).soft_labels(x).probs
    save_projector(tmp_path / "f16", proj, dtype=torch.float16)  # rounds proj in place
    after = ProjectorSource(proj).soft_labels(x).probs
    back = load_projector(tmp_path / "f16", class_names=CLASSES)
    assert torch.equal(after, ProjectorSource(back).soft_labels(x).probs)
    assert (after - before).abs().max() < 1e-2
    lora_bytes = sum(p.numel() * p.element_size() for p in proj.lora_state_dict().values())
    assert projector_bytes(tmp_path / "f32") - projector_bytes(tmp_path / "f16") == pytest.approx(lora_bytes / 2, abs=64)


def test_engine_checkpoint_as_encoder(tmp_path):
    """kind 'engine': a grey classifier this engine wrote (e.g. a teacher trained on other data)
    becomes the frozen base; grey images stay grey, RGB is averaged, LoRA trains its convs."""
    from distill.models import create_model, save_model

    torch.manual_seed(0)
    clf = create_model("test_resnet", 3, 1, 16, ("a", "b", "c")).eval()
    save_model(tmp_path / "enc.safetensors", clf)
    cfg = ProjectorConfig(kind="engine", model_name="test_resnet", checkpoint=str(tmp_path / "enc.safetensors"),
                          head_init="prototype", lora_rank=2)
    x, y = data(20, channels=1, size=16)
    proj = build_projector(cfg, CLASSES, images=x, targets=y)
    assert proj.encoder.in_chans == 1 and proj.encoder.input_size == 16
    with torch.no_grad():  # the body is the checkpoint's network without its classifier
        assert torch.allclose(proj.encoder(clf.preprocess(x)), clf.net.forward_head(clf.net.forward_features(
            clf.preprocess(x)), pre_logits=True))
        assert torch.allclose(proj(x), proj(x.expand(-1, 3, -1, -1)), atol=1e-6)
    apply_lora(proj)
    proj(x).sum().backward()
    assert all(p.grad is not None for p in proj.lora_state_dict().values())
    with pytest.raises(ValueError, match="needs the checkpoint"):
        ProjectorConfig(kind="engine", model_name="test_resnet", head_init="prototype")


def test_open_clip_checkpoints_load_with_open_clips_loader_and_torchscript_is_refused(tiny_cfg, tmp_path):
    base = build_encoder(tiny_cfg)  # open_clip.load_checkpoint, strict, weights_only
    assert base.checksum == build_encoder(tiny_cfg).checksum
    model = open_clip.create_model("tinyclip_test", pretrained=None)
    with pytest.warns(torch.jit.TracerWarning):  # tracing an attention block warns; the archive is what matters
        torch.jit.save(torch.jit.trace(model.visual, torch.rand(1, 3, 32, 32)), str(tmp_path / "openai.pt"))
    with pytest.raises(ValueError, match="TorchScript archive .*-quickgelu"):
        build_encoder(dataclasses.replace(tiny_cfg, checkpoint=str(tmp_path / "openai.pt")))
    torch.save({"not": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="open_clip cannot load it into 'tinyclip_test'"):
        build_encoder(dataclasses.replace(tiny_cfg, checkpoint=str(tmp_path / "other.pt")))
