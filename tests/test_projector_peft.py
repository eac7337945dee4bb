"""A HeLlO projector exported in peft's adapter format (synth.peft_export): peft loads it onto a
freshly built base and computes what the projector computes; distill reads it back to the same
labels, as a label source and as a pool teacher, with the same refusals."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

peft = pytest.importorskip("peft")
pytest.importorskip("timm")

from distill.artefacts import ArtefactError
from distill.config import ProjectorTeacherConfig
from synth.hello import ProjectorLabels, ProjectorOptions, projector_teacher
from synth.peft_export import (ADAPTER_WEIGHTS, HEAD_FILE, adapter_base, adapter_metadata, export_peft_adapter,
                               load_peft_adapter)
from synth.projector import (ADAPTER_CONFIG, ADAPTER_META, ProjectorConfig, ProjectorSource, apply_lora,
                             build_projector, load_projector, projector_path, save_projector)

NAMES = tuple(str(i) for i in range(10))
SIZE = 16
CFG = ProjectorConfig(kind="timm", model_name="test_resnet", head_init="random", input_size=SIZE, lora_rank=2)


def _save(dir_, dtype=torch.float32):
    """A tiny timm projector (random-init base, seeded; random head, stored) with non-zero LoRA
    factors, saved as an artefact's labels/projector.safetensors fitted for 16 px grey data."""
    proj = apply_lora(build_projector(CFG, list(NAMES)))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in proj.lora_state_dict().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return save_projector(dir_ / "labels", proj, meta={"data_image_size": SIZE, "data_channels": 1,
                                                       "teachers": json.dumps(["t"])}, dtype=dtype)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("peft")
    src = _save(d / "art", dtype=torch.float16)
    return src, export_peft_adapter(d / "art", d / "adapter")


def images(n=6):
    return torch.rand(n, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_files_are_peft_format(exported):
    src, out = exported
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_META, HEAD_FILE} <= {p.name for p in out.iterdir()}
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    lora = peft.LoraConfig.from_pretrained(str(out))
    assert lora.r == 2 and lora.lora_alpha == CFG.lora_alpha and lora.peft_type == "LORA"
    with safe_open(str(out / ADAPTER_WEIGHTS), framework="pt") as f, safe_open(str(src), framework="pt") as g:
        keys = list(f.keys())
        assert all(k.startswith("base_model.model.") and ".lora_" in k for k in keys)
        assert {f.get_tensor(k).dtype for k in keys} == {torch.float16}  # stored dtype kept
        assert len(keys) == len(list(g.keys())) - 1  # all factors; the head is beside
        torch.testing.assert_close(load_file(str(out / HEAD_FILE))["head.weight"], g.get_tensor("head.weight"),
                                   rtol=0, atol=0)
    meta = adapter_metadata(out)
    assert meta["class_names"] == list(NAMES) and meta["data_image_size"] == SIZE and meta["teachers"] == ["t"]
    assert meta["config"]["model_name"] == "test_resnet" and meta["files"][ADAPTER_WEIGHTS]["bytes"] > 0
    assert projector_path(out) == out and projector_path(out / ADAPTER_CONFIG) == out
    assert projector_path(src.parent.parent) == src


def test_peft_loads_it_onto_a_fresh_base(exported, tmp_path):
    src, out = exported
    # built here, not by the reader: the seeded base + the stored head (its fp16-rounded random init)
    w = load_file(str(out / HEAD_FILE))["head.weight"].float()
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=False).requires_grad_(False)
    head.weight.copy_(w)
    fresh = build_projector(CFG, list(NAMES), head=head)
    model = peft.PeftModel.from_pretrained(fresh, str(out)).eval()
    ours = load_projector(src.parent)
    with torch.no_grad():
        torch.testing.assert_close(model(images()), ours(images()), rtol=0, atol=0)
    theirs = dict(model.base_model.model.named_parameters())
    assert all(torch.equal(theirs[n], p) for n, p in ours.lora_state_dict().items())
    base = adapter_base(out)  # the same base, from the export's record (docs/hello.md's recipe)
    assert torch.equal(base.head.weight, fresh.head.get_base_layer().weight)
    with torch.no_grad():
        assert torch.equal(peft.PeftModel.from_pretrained(base, str(out)).eval()(images()), ours(images()))

    src32 = _save(tmp_path / "art32")  # fp32 storage: the stored head is the seeded init, so a plain fresh build fits
    out32 = export_peft_adapter(src32, tmp_path / "a32")
    model = peft.PeftModel.from_pretrained(build_projector(CFG, list(NAMES)), str(out32))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images()), load_projector(src32.parent)(images()), rtol=0, atol=0)


def test_open_clip_text_head_round_trip(tmp_path):
    """The paper's setting: a CLIP image tower (peft's MultiheadAttention LoRA) and a text head,
    which is regenerated from the class names rather than stored."""
    open_clip = pytest.importorskip("open_clip")
    tiny = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2},
            "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2}}
    (tmp_path / "tinyclip_peft.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(str(tmp_path / "tinyclip_peft.json"))
    torch.manual_seed(1)
    torch.save(open_clip.create_model("tinyclip_peft", pretrained=None).state_dict(), tmp_path / "tiny.pt")
    cfg = ProjectorConfig(kind="open_clip", model_name="tinyclip_peft", checkpoint=str(tmp_path / "tiny.pt"))
    names = ["cat", "dog", "car"]
    proj = apply_lora(build_projector(cfg, names))
    with torch.no_grad():
        for p in proj.lora_state_dict().values():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    save_projector(tmp_path / "p", proj, meta={"data_image_size": SIZE, "data_channels": 1})
    out = export_peft_adapter(tmp_path / "p", tmp_path / "adapter")
    assert not (out / HEAD_FILE).exists() and any(".attn.lora_A" in k for k in load_file(str(out / ADAPTER_WEIGHTS)))
    model = peft.PeftModel.from_pretrained(build_projector(cfg, names), str(out)).eval()
    with torch.no_grad():
        want = proj.eval()(images())
        torch.testing.assert_close(model(images()), want, rtol=0, atol=0)
        torch.testing.assert_close(load_peft_adapter(out, class_names=names)(images()), want, rtol=0, atol=0)


def test_distill_reads_it_back_to_identical_labels(exported, tmp_path):
    src, out = exported
    back, ours = load_peft_adapter(out), load_projector(src.parent)
    x = images()
    assert torch.equal(ProjectorSource(back).soft_labels(x).probs, ProjectorSource(ours).soft_labels(x).probs)
    assert all(p.requires_grad for p in back.lora_state_dict().values())  # as load_projector gives it
    labeler = ProjectorLabels(ProjectorOptions(projector=out)).load(NAMES, SIZE, 1, "cpu")
    batch = labeler(x, torch.arange(6) % 10, torch.arange(6), 0, torch.Generator().manual_seed(0))
    assert batch.soft.probs.shape == (6, 10)
    # a recipe's pool teacher may name the adapter directory itself
    cfg = ProjectorTeacherConfig(projector=out)
    assert cfg.projector == out and cfg.display_name == f"projector_{out.name}"
    teacher = projector_teacher(cfg, NAMES, SIZE, 1)
    with torch.no_grad():
        assert torch.equal(teacher.model(x), ours(x))


def test_refusals_by_name(exported, tmp_path):
    src, out = exported
    with pytest.raises(ArtefactError, match="adapter.*class list mismatch"):
        ProjectorLabels(ProjectorOptions(projector=out)).load(tuple(f"c{i}" for i in range(10)), SIZE, 1, "cpu")
    with pytest.raises(ArtefactError, match="adapter.*data_image_size 16.*8"):
        ProjectorLabels(ProjectorOptions(projector=out)).load(NAMES, 8, 1, "cpu")
    with pytest.raises(FileExistsError, match="not empty"):
        export_peft_adapter(src, out)  # without overwrite
    with pytest.raises(FileExistsError, match="not empty"):
        export_peft_adapter(src, src.parent, overwrite=True)  # never over a directory that is not an export
    with pytest.raises(ValueError, match="already a peft adapter"):
        export_peft_adapter(out, tmp_path / "again")

    edited = export_peft_adapter(src, tmp_path / "edited")
    cfg = json.loads((edited / ADAPTER_CONFIG).read_text())
    (edited / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "lora_alpha": 99.0}))
    with pytest.raises(ValueError, match=r"adapter_config.json differs .*\['lora_alpha'\]"):
        load_peft_adapter(edited)
    swapped = export_peft_adapter(src, tmp_path / "swapped")
    w = load_file(str(swapped / ADAPTER_WEIGHTS))
    save_file({k: v * 2 for k, v in w.items()}, str(swapped / ADAPTER_WEIGHTS))
    with pytest.raises(ArtefactError, match="adapter_model.safetensors: missing or changed since export"):
        ProjectorLabels(ProjectorOptions(projector=swapped)).load(NAMES, SIZE, 1, "cpu")
    assert export_peft_adapter(src, swapped, overwrite=True) == swapped  # an earlier export is replaced whole
    assert load_peft_adapter(swapped, class_names=NAMES) is not None


def test_export_is_whole_or_absent(exported, tmp_path, monkeypatch):
    src, _ = exported
    done = export_peft_adapter(src, tmp_path / "done")
    before = {p.name: p.read_bytes() for p in done.iterdir()}

    def dies_half_way(self, save_directory, **kwargs):
        os.makedirs(save_directory, exist_ok=True)
        (Path(save_directory) / ADAPTER_CONFIG).write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", dies_half_way)
    for out, overwrite in ((tmp_path / "new", False), (done, True)):
        with pytest.raises(OSError, match="disk full"):
            export_peft_adapter(src, out, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done"]  # no half export, no temporary
    assert {p.name: p.read_bytes() for p in done.iterdir()} == before
