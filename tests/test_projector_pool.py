"""A HeLlO projector as a pool teacher of `distill train` (label-light KD): recipe validation,
the MEAL V2 mean with a real teacher, refusals by file, a one-epoch run on tiny digits."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
timm = pytest.importorskip("timm")

from distill.artefacts import ArtefactError
from distill.config import ConfigError, ProjectorTeacherConfig
from distill.data import load_data
from distill.models import create_model, load_model, save_model
from distill.recipe import parse_config
from distill.runner import train
from distill.teacher_pool import build_pool
from synth.hello import projector_teacher
from synth.projector import ProjectorConfig, apply_lora, build_projector, load_projector, save_projector

NAMES = tuple(str(i) for i in range(10))  # digits' class names
SIZE = 16


def _save(dir_, names=NAMES, size=SIZE, seed=0):
    """A tiny timm projector (random-init base, seeded) with non-zero LoRA factors, saved as an
    artefact's labels/projector.safetensors fitted for `size` px grey data."""
    cfg = ProjectorConfig(kind="timm", model_name="test_resnet", head_init="random", input_size=SIZE, lora_rank=2)
    proj = apply_lora(build_projector(cfg, list(names)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in proj.lora_state_dict().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return save_projector(dir_ / "labels", proj, meta={"data_image_size": size, "data_channels": 1})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("projpool")
    torch.manual_seed(0)
    save_model(d / "teacher.safetensors", create_model("test_resnet", 10, 1, SIZE, NAMES))
    return {"teacher": d / "teacher.safetensors", "art": _save(d / "art").parent.parent,
            "other_classes": _save(d / "other_classes", names=tuple(f"c{i}" for i in range(10))).parent.parent,
            "other_size": _save(d / "other_size", size=8).parent.parent}


def _recipe(tmp_path, teachers, **pool):
    return {"name": "pp", "out_dir": str(tmp_path / "runs"), "seed": 0,
            "data": {"source": "digits", "image_size": SIZE, "train_limit": 48},
            "student": {"model": "test_vit"}, "optim": {"lr": 0.05},
            "trainer": {"epochs": 1, "batch_size": 16, "eval_batch_size": 64},
            "pool": {"teachers": teachers, **pool}}


def test_recipe_parses_and_refuses_by_field(tmp_path, files):
    art = files["art"]
    file = art / "labels" / "projector.safetensors"
    for given in (art, art / "labels", file):  # all three resolve to the file
        t = parse_config(_recipe(tmp_path, [{"projector": str(given)}])).pool.teachers[0]
        assert isinstance(t, ProjectorTeacherConfig) and t.projector == file and t.display_name == "projector_art"
    teacher = {"model": "test_resnet", "checkpoint": str(files["teacher"])}
    with pytest.raises(ConfigError, match=r"pool.teachers.1: a teacher is a classifier .*projector.*got keys \['proj'\]"):
        parse_config(_recipe(tmp_path, [teacher, {"proj": str(art)}]))
    with pytest.raises(ConfigError, match=r"pool.teachers.0.projector: projector .* does not exist"):
        parse_config(_recipe(tmp_path, [{"projector": str(tmp_path / "nowhere")}]))
    with pytest.raises(ConfigError, match=r"pool.teachers.0.checkpoint: checkpoint file .* does not exist"):
        parse_config(_recipe(tmp_path, [{"projector": str(art), "checkpoint": str(tmp_path / "enc.safetensors")}]))
    with pytest.raises(ConfigError, match=r"pool.teachers.0.model: unknown key"):
        parse_config(_recipe(tmp_path, [{"projector": str(art), "model": "test_resnet"}]))
    with pytest.raises(ConfigError, match=r"pool: weighting 'distill_weighted' is not supported with projector"):
        parse_config(_recipe(tmp_path, [teacher, {"projector": str(art)}], weighting="distill_weighted", labelled=8))
    with pytest.raises(ConfigError, match=r"pool: heads 'all' is not supported with projector"):
        parse_config(_recipe(tmp_path, [teacher, {"projector": str(art)}], heads="all", labelled=8))


def test_pool_is_meal_v2_mean_of_teacher_and_projector(tmp_path, files):
    cfg = parse_config(_recipe(tmp_path, [{"name": "t", "model": "test_resnet", "checkpoint": str(files["teacher"])},
                                          {"name": "p", "projector": str(files["art"])}]))
    train_set, _ = load_data(cfg.data)
    pool = build_pool(cfg, train_set, torch.device("cpu"))
    x = torch.stack([train_set[i][0] for i in range(6)]).float() / 255
    soft = pool.soft_labels(x)
    with torch.no_grad():
        p_t = load_model(files["teacher"]).eval()(x).softmax(-1)
        p_p = load_projector(files["art"] / "labels").eval()(x).softmax(-1)
    torch.testing.assert_close(soft.probs, (p_t + p_p) / 2, atol=1e-5, rtol=1e-5)
    assert pool.cost.queries == {"t": 6, "p": 6}
    meta = pool.teachers[1].cfg()
    assert meta["kind"] == "hello_projector" and meta["projector"].endswith("projector.safetensors")
    assert len(meta["base_checksum"]) == 64 and meta["class_names"] == list(NAMES)


def test_projector_for_other_classes_size_or_base_refused_by_file(tmp_path, files):
    for key, match in (("other_classes", "class list mismatch"), ("other_size", "data_image_size 8, the data here has 16")):
        cfg = ProjectorTeacherConfig(projector=files[key])
        with pytest.raises(ArtefactError, match=rf"{key}/labels/projector.safetensors: .*{match}"):
            projector_teacher(cfg, NAMES, SIZE, 1)
    with pytest.raises(ArtefactError, match=r"data_channels 1, the data here has 3"):
        projector_teacher(ProjectorTeacherConfig(projector=files["art"]), NAMES, SIZE, 3)
    from safetensors.torch import save_file

    torch.manual_seed(5)  # a base checkpoint that is not the one the projector was fitted on
    save_file(timm.create_model("test_resnet", num_classes=0).state_dict(), str(tmp_path / "enc.safetensors"))
    with pytest.raises(ArtefactError, match=r"art/labels/projector.safetensors: base encoder checksum mismatch"):
        projector_teacher(ProjectorTeacherConfig(projector=files["art"], checkpoint=tmp_path / "enc.safetensors"),
                          NAMES, SIZE, 1)
    # and through the runner, before any training step
    cfg = parse_config(_recipe(tmp_path, [{"projector": str(files["other_size"])}]))
    with pytest.raises(ArtefactError, match="other_size/labels/projector.safetensors"):
        train(cfg)
    assert not (cfg.run_dir / "config.yaml").exists()


def test_train_with_projector_only_pool(tmp_path, files):
    cfg = parse_config(_recipe(tmp_path, [{"projector": str(files["art"])}]))
    result = train(cfg)
    assert result.final["teacher_queries_by_teacher"] == {"projector_art": 48}
    assert 0 <= result.final["test_top1"] <= 100 and (result.run_dir / "report.md").exists()
