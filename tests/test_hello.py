"""HeLlO in the synth pipeline on tiny digits: projector fitted after synthesis with a tiny timm
encoder, eval-synth trains on projector labels, refusals by name, exact bytes accounting."""
from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("peft")
timm = pytest.importorskip("timm")

from distill.artefacts import ArtefactError
from distill.config import ConfigError
from distill.models import create_model, save_model
from distill.recipe import parse_synth_config
from synth.artefact import read_artefact
from synth.config import RelabelConfig
from synth.eval_synth import eval_synth
from synth.hello import projector_labeler
from synth.run import synthesize

OPS = ["color", "crop", "cutout", "scale", "rotate"]


def _encoder_ckpt(path, seed):
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("hello")
    torch.manual_seed(0)
    save_model(d / "teacher.safetensors", create_model("test_resnet", 10, 1, 8, tuple(str(i) for i in range(10))))
    return {"teacher": d / "teacher.safetensors", "enc": _encoder_ckpt(d / "enc.safetensors", 1),
            "other": _encoder_ckpt(d / "other.safetensors", 2)}


def recipe(tmp_path, files, name="hello", **projector):
    raw = {"name": name, "out_dir": str(tmp_path / "synth"), "seed": 0,
           "data": {"source": "digits", "image_size": 8, "train_limit": 200},
           "ipc": 2, "method": "distribution_matching", "options": {"batch_real": 8, "dsa_ops": OPS}, "iterations": 2,
           "teachers": [{"model": "test_resnet", "checkpoint": str(files["teacher"])}],
           "labels": {"mode": "projector", "relabel": {"epochs": 11, "crops_per_image": 1, "topk": 3},
                      "projector": {"kind": "timm", "model": "test_resnet", "checkpoint": str(files["enc"]),
                                    "input_size": 16, "steps": 4, "batch_size": 16, "real_per_class": 2,
                                    "probe_views": 16, **projector}},
           "eval": {"epochs": 2, "seeds": 1, "batch_size": 64, "dsa_ops": OPS, "full_data": False}}
    return parse_synth_config(raw)


def test_projector_artefact_bytes_and_eval_synth(tmp_path, files):
    from synth.relabel import relabel_store
    from synth.run import build_teachers

    cfg = recipe(tmp_path, files, image_opt={"enabled": True, "steps": 2, "batch_size": 8})
    m = synthesize(cfg, progress=False).manifest
    root = cfg.run_dir
    p = m["projector"]
    on_disk = (root / "labels" / "projector.safetensors").stat().st_size
    assert m["label_mode"] == "projector" and p["bytes"] == on_disk == m["files"]["labels/projector.safetensors"]["bytes"]
    assert m["bytes"]["labels"] == on_disk and p["bytes_ratio"] == on_disk / p["soft_label_bytes_replaced"]
    assert m["fit"]["probe_after"]["mse"] >= 0 and "image_opt" in m

    # the replaced bytes equal the store the recipe's relabel settings really write (all 11 epochs: two-digit epochs lengthen the headers)
    art = read_artefact(root)
    from distill.data import load_data

    real, _ = load_data(cfg.data)
    store = relabel_store(tmp_path / "store", art.images, build_teachers(cfg, real, torch.device("cpu")),
                          cfg.labels.relabel, cfg.seed, cfg.hash(), torch.device("cpu"), progress=False)
    assert store["bytes"] == p["soft_label_bytes_replaced"]

    report = eval_synth(root, progress=False, cache_dir=tmp_path / "cache")
    cells = {r.set_name: r for r in report.results}
    assert set(cells) == {"distilled", "random"}
    for r in cells.values():
        assert r.label_mode == "projector" and r.label_bytes == on_disk and 0 <= r.final[0] <= 100


def test_refusals_before_compute(tmp_path, files):
    with pytest.raises(ConfigError, match="checksum"):
        synthesize(recipe(tmp_path, files, "ck", checksum="0" * 64), progress=False)
    with pytest.raises(ConfigError, match="lora_targets.*no_such_layer"):
        synthesize(recipe(tmp_path, files, "lt", lora_targets=["no_such_layer"]), progress=False)
    assert not (tmp_path / "synth" / "ck" / "work").exists() and not (tmp_path / "synth" / "lt" / "work").exists()
    with pytest.raises(ConfigError, match="labels.projector"):
        parse_synth_config({**recipe(tmp_path, files).to_dict(), "labels": {"mode": "projector"}})


def test_projector_refused_on_other_data_or_base(tmp_path, files):
    cfg = recipe(tmp_path, files, "ref")
    synthesize(cfg, progress=False)
    art = read_artefact(cfg.run_dir)
    rc = RelabelConfig(epochs=1, topk=3)
    labeler, nbytes = projector_labeler(art, rc, "cpu")
    assert nbytes == (cfg.run_dir / "labels" / "projector.safetensors").stat().st_size

    def other(**m):
        return types.SimpleNamespace(root=art.root, manifest={**art.manifest, **m})

    with pytest.raises(ArtefactError, match="projector.safetensors.*class list"):
        projector_labeler(other(class_names=[f"c{i}" for i in range(10)]), rc, "cpu")
    with pytest.raises(ArtefactError, match="projector.safetensors.*data_image_size 8.*16"):
        projector_labeler(other(image_size=16), rc, "cpu")
    with pytest.raises(ArtefactError, match="projector.safetensors.*checksum"):
        projector_labeler(art, rc, "cpu", checkpoint=files["other"])
    x = art.images.images[:4].float() / 255
    batch = labeler(x, art.images.targets[:4], torch.arange(4), 0, torch.Generator().manual_seed(0))
    assert batch.soft.probs.shape == (4, 10) and torch.allclose(batch.soft.probs.sum(-1), torch.ones(4))
