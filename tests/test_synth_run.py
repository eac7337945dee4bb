"""Synthesis jobs, the distilled-dataset artefact and the eval-synth protocol, on tiny digits."""
from __future__ import annotations

import json

import pytest
import torch

from distill.artefacts import ArtefactError, load_tensors
from distill.config import ConfigError
from distill.data import DataError
from distill.models import create_model, save_model
from distill.recipe import parse_synth_config
from synth.artefact import read_artefact
from synth.eval_synth import eval_synth, hard_labeler, random_subset, train_student
from synth.methods import SYNTH_METHODS
from synth.run import synthesize

OPS = ["color", "crop", "cutout", "scale", "rotate"]  # digits: no flip in DSA


@pytest.fixture
def recipe(tmp_path):
    def make(name="syn", **over):
        raw = {"name": name, "out_dir": str(tmp_path / "synth"), "seed": 0,
               "data": {"source": "digits", "image_size": 8, "train_limit": 200},
               "ipc": 2, "method": "distribution_matching", "options": {"batch_real": 8, "dsa_ops": OPS},
               "iterations": 2,
               "eval": {"epochs": 2, "seeds": 2, "full_epochs": 1, "batch_size": 64, "dsa_ops": OPS}}
        for k, v in over.items():
            raw[k] = {**raw[k], **v} if k in ("data", "eval") else v
        return parse_synth_config(raw)

    return make


@pytest.fixture(scope="module")
def bn_teacher(tmp_path_factory):
    """An (untrained) BatchNorm ResNet checkpoint: enough to exercise bn_matching and relabel."""
    path = tmp_path_factory.mktemp("teacher") / "resnet.safetensors"
    torch.manual_seed(0)
    save_model(path, create_model("test_resnet", 10, 1, 8, tuple(str(i) for i in range(10))))
    return path


def _images(root):
    return load_tensors(root / "images.safetensors")[0]["images"]


def test_registry_methods_have_the_interface():
    assert {"bn_matching", "distribution_matching", "gradient_matching"} <= set(SYNTH_METHODS.names())
    for name in SYNTH_METHODS.names():
        cls = SYNTH_METHODS.get(name)
        assert hasattr(cls, "Options") and hasattr(cls, "needs_teachers") and callable(cls.loss)
        cls.Options()  # defaults are valid


def test_gradient_matching_with_flip_synthesises(recipe):
    cfg = recipe("gm", method="gradient_matching", flip=True, ipc=1,
                 options={"batch_real": 4, "dsa_ops": OPS, "inner_loop": 1, "outer_loop": 2})
    m = synthesize(cfg, progress=False).manifest
    assert m["method"] == "gradient_matching" and m["flip"] and m["num_images"] == 10


def test_tiny_synth_then_eval_synth_end_to_end(recipe, tmp_path):
    res = synthesize(recipe(flip=True), progress=False)
    m = res.manifest
    assert m["method"] == "distribution_matching" and m["flip"] and m["ipc"] == 2 and m["num_images"] == 20
    assert m["bytes"]["images"] > 0 and m["bytes"]["labels"] == 0 and m["label_mode"] == "hard"
    assert len(list((res.root / "grids").glob("class_*.png"))) == 10
    art = read_artefact(res.root)
    assert art.images.images.dtype == torch.uint8 and art.images.targets.tolist() == [c for c in range(10) for _ in (0, 1)]

    report = eval_synth(res.root, progress=False, cache_dir=tmp_path / "cache")
    sets = {(r.set_name, r.student) for r in report.results}
    assert sets == {("distilled", "convnet3"), ("random", "convnet3"), ("full", "convnet3")}
    for r in report.results:
        assert len(r.final) == 2 and all(0 <= a <= 100 for a in r.final)
    assert report.improvement("convnet3") == pytest.approx(report.cell("convnet3", "distilled").mean
                                                           - report.cell("convnet3", "random").mean)
    text = (res.root / "eval" / "report.md").read_text()
    assert "final top-1" in text and "Δ vs random subset" in text and "best-epoch" not in text
    assert json.loads((res.root / "eval" / "results.json").read_text())["improvement_over_random"]["convnet3"] is not None

    best = eval_synth(res.root, progress=False, cache_dir=tmp_path / "cache", best_epoch=True, seeds=1,
                      overrides=["random_subset=false", "full_data=false"])
    cell = best.cell("convnet3", "distilled")
    assert cell.best[0][0] >= cell.final[0] and "(best epoch)" in best.text()
    assert cell.final[0] == report.cell("convnet3", "distilled").final[0]  # same seed, same run


def test_bn_matching_relabel_confident_init_fp16(recipe, bn_teacher, tmp_path):
    cfg = recipe("bn", method="bn_matching", options={"jitter": 1, "jitter_flip": False},
                 init={"kind": "real_confident", "candidates": 6},
                 teachers=[{"model": "test_resnet", "checkpoint": str(bn_teacher)}], storage="fp16",
                 labels={"mode": "relabel", "relabel": {"epochs": 2, "crops_per_image": 2, "topk": 3}},
                 chunk={"classes": 5})
    res = synthesize(cfg, progress=False)
    m = res.manifest
    assert m["storage"] == "fp16" and m["label_mode"] == "relabel" and m["bytes"]["labels"] > 0
    assert m["teachers"][0]["checkpoint_sha256"] and len(m["timing"]["chunks"]) == 2
    art = read_artefact(res.root)
    assert _images(res.root).dtype == torch.float16
    report = eval_synth(res.root, progress=False, overrides=["full_data=false"], cache_dir=tmp_path / "cache")
    cells = {r.set_name: r for r in report.results}
    assert cells["distilled"].label_mode == cells["random"].label_mode == "relabel"
    assert cells["distilled"].label_bytes > 0 and cells["random"].label_bytes > 0
    assert art.labels_root.is_dir()


def test_artefact_round_trip_and_corruption_refused_by_file(recipe):
    res = synthesize(recipe(), progress=False)
    art = read_artefact(res.root)
    assert torch.equal(art.images.images, _images(res.root)) and art.manifest == res.manifest

    for rel in ("images.safetensors", "grids/class_0003.png", "recipe.yaml"):
        path = res.root / rel
        original = path.read_bytes()
        damaged = bytearray(original)
        damaged[len(damaged) // 2] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(ArtefactError, match=rel.split("/")[-1]):
            read_artefact(res.root)
        path.write_bytes(original)
    (res.root / "class_names.json").unlink()
    with pytest.raises(ArtefactError, match="class_names.json: missing"):
        read_artefact(res.root)
    (res.root / "manifest.json").write_text("{not json")
    with pytest.raises(ArtefactError, match="manifest.json: corrupted"):
        read_artefact(res.root)


def test_killed_synthesis_resumes_from_last_chunk(recipe, monkeypatch):
    from synth import run

    whole = synthesize(recipe("whole", chunk={"classes": 4}), progress=False)
    calls = []
    original = run.SynthJob.run_chunk

    def crash_on_second(self, ch):
        calls.append(ch.name)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated kill")
        original(self, ch)

    cfg = recipe("killed", chunk={"classes": 4})
    monkeypatch.setattr(run.SynthJob, "run_chunk", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        synthesize(cfg, progress=False)
    assert not (cfg.run_dir / "manifest.json").exists()
    with pytest.raises(ArtefactError, match="not finished"):
        read_artefact(cfg.run_dir)
    monkeypatch.setattr(run.SynthJob, "run_chunk", lambda self, ch: (calls.append(ch.name), original(self, ch)))
    resumed = synthesize(cfg, progress=False)
    assert calls[0] not in calls[2:] and len(calls) == 2 + 2  # the finished chunk was not run again
    assert resumed.chunks_run == 2
    assert torch.equal(_images(whole.root), _images(resumed.root))
    assert not (cfg.run_dir / "work").exists()  # chunks go once the manifest is written


def test_keep_work_lets_another_recipe_reuse_the_chunks(recipe):
    kept = synthesize(recipe("kept", ipc=1, chunk={"classes": 5}, keep_work=True), progress=False)
    assert len(list((kept.root / "work").glob("*.safetensors"))) == 2


def test_ranks_shard_chunks_and_the_last_merges(recipe):
    single = synthesize(recipe("single", ipc=1, chunk={"classes": 5}), progress=False)
    cfg = recipe("sharded", ipc=1, chunk={"classes": 5})
    r0 = synthesize(cfg, rank=0, world=2, progress=False)
    assert r0.manifest is None and r0.chunks_run == 1  # chunk 0 of 2
    r1 = synthesize(cfg, rank=1, world=2, progress=False)
    assert r1.manifest is not None and r1.chunks_run == 1
    assert torch.equal(_images(single.root), _images(cfg.run_dir))


def test_eval_uses_fresh_weights_per_seed(recipe, tmp_path):
    from distill.data import load_data

    cfg = recipe()
    train, test = load_data(cfg.data)
    small = random_subset(train, 2, 0)
    protocol = cfg.eval.model_copy(update={"augment": "none"})
    labeler = hard_labeler(protocol, small)

    def weights(seed, where):
        train_student("convnet3", seed, small, test, labeler, 1, protocol, cfg.data, tmp_path / where / "seed", "cpu")
        return load_tensors(tmp_path / where / "seed" / "student.safetensors")[0]

    a, b, c = weights(0, "a"), weights(0, "b"), weights(1, "c")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_bad_input_is_refused_before_compute(recipe, tmp_path, monkeypatch):
    from synth import run

    monkeypatch.setattr(run, "optimise", lambda *a, **k: pytest.fail("compute started"))
    with pytest.raises(ConfigError, match="ipc: 30 .*init.kind 'real'"):
        synthesize(recipe(ipc=30), progress=False)
    vit = tmp_path / "vit.safetensors"
    save_model(vit, create_model("test_vit", 10, 1, 8, tuple(str(i) for i in range(10))))
    with pytest.raises(ConfigError, match="no BatchNorm2d"):
        synthesize(recipe(method="bn_matching", options={}, teachers=[{"model": "test_vit", "checkpoint": str(vit)}]),
                   progress=False)
    with pytest.raises(ConfigError, match="need trained teachers"):
        recipe(method="bn_matching", options={})
    with pytest.raises(ConfigError, match="unknown method 'dm'"):
        recipe(method="dm")
    with pytest.raises(ConfigError, match="batch_reel"):
        recipe(options={"batch_reel": 3})


def test_eval_refuses_mismatched_data(recipe, tmp_path):
    import numpy as np

    res = synthesize(recipe(), progress=False)
    with pytest.raises(DataError, match="8px"):
        eval_synth(res.root, image_size=16, progress=False)
    other = tmp_path / "other.npz"
    x = np.zeros((6, 8, 8), np.uint8)
    np.savez(other, x_train=x, y_train=np.array([0, 1, 2, 0, 1, 2]), x_test=x, y_test=np.array([0, 1, 2, 0, 1, 2]))
    with pytest.raises(DataError, match="differ from the artefact's"):
        eval_synth(res.root, data_spec=str(other), progress=False)


def test_shipped_recipes_validate(tmp_path):
    """Every synth recipe in configs/ loads (teacher checkpoints and data paths pointed at stand-ins)."""
    from pathlib import Path

    import yaml

    from distill.recipe import load_synth_config

    repo = Path(__file__).resolve().parent.parent
    stand_in = tmp_path / "teacher.safetensors"
    stand_in.write_bytes(b"")
    folder = tmp_path / "imagenet"
    folder.mkdir()
    paths = sorted((repo / "configs" / "synth").glob("*.yaml")) + sorted((repo / "configs" / "imagenet").glob("synth_*.yaml"))
    recipes = [p for p in paths if "ipc" in yaml.safe_load(p.read_text())]  # not the student/teacher recipes
    assert len(recipes) >= 20
    for path in recipes:
        raw = yaml.safe_load(path.read_text())
        over = [f"teachers.{i}.checkpoint={stand_in}" for i in range(len(raw.get("teachers") or []))]
        if raw["data"].get("path"):
            over.append(f"data.path={folder if raw['data']['source'] == 'imagefolder' else stand_in}")
        cfg = load_synth_config(path, over)
        assert cfg.name == path.stem or cfg.name.startswith("in1k_")


def test_relabel_label_spec_defaults_and_round_trips(recipe, bn_teacher):
    """bn_matching relabel: SRe2L's KL at T = 3 unless the recipe says otherwise; other methods
    FKD's soft CE at T = 1; the resolved recipe (the artefact's recipe.yaml) states it and reads
    back to the same spec; a relabel section written before the spec existed reads as T = 1."""
    import yaml

    from distill.config import dump_config
    from synth.config import RelabelConfig

    teachers = [{"model": "test_resnet", "checkpoint": str(bn_teacher)}]
    relabel = {"mode": "relabel", "relabel": {"epochs": 1, "topk": 3}}
    bn = recipe("bn", method="bn_matching", options={}, teachers=teachers, labels=relabel)
    assert (bn.labels.relabel.loss, bn.labels.relabel.temperature) == ("kl", 3.0)
    dm = recipe("dm", teachers=teachers, labels=relabel)
    assert (dm.labels.relabel.loss, dm.labels.relabel.temperature) == ("soft_ce", 1.0)
    own = recipe("own", method="bn_matching", options={}, teachers=teachers,
                 labels={"mode": "relabel", "relabel": {"loss": "soft_ce"}})
    assert (own.labels.relabel.loss, own.labels.relabel.temperature) == ("soft_ce", 1.0)

    section = yaml.safe_load(dump_config(bn))["labels"]["relabel"]  # as the artefact's recipe.yaml holds it
    assert section["loss"] == "kl" and section["temperature"] == 3.0
    assert RelabelConfig.model_validate(section) == bn.labels.relabel
    older = {k: v for k, v in section.items() if k not in ("loss", "temperature")}
    old = RelabelConfig.model_validate(older)  # how eval-synth reads an artefact made before the spec
    assert (old.loss, old.temperature) == ("soft_ce", 1.0)


def test_eval_synth_trains_bn_matching_relabel_students_by_kl_at_t3(recipe, bn_teacher, tmp_path, monkeypatch):
    """The artefact's label spec reaches both ends: its store holds the teacher's softmax at T = 3,
    and eval-synth's students of the distilled set and the random subset learn it by KL at T = 3;
    the same artefact with an older recipe (no spec) trains them by soft CE at T = 1."""
    import dataclasses

    import yaml

    from distill.models import load_model
    from synth import eval_synth as es
    from teachers.store_replay import LabelStore

    cfg = recipe("bn_kl", ipc=1, method="bn_matching", options={"jitter": 1, "jitter_flip": False},
                 teachers=[{"model": "test_resnet", "checkpoint": str(bn_teacher)}],
                 labels={"mode": "relabel", "relabel": {"epochs": 1, "topk": "full"}})
    res = synthesize(cfg, progress=False)
    art = read_artefact(res.root)
    assert yaml.safe_load(art.recipe_yaml)["labels"]["relabel"]["temperature"] == 3.0
    assert "T = 3" in LabelStore(art.labels_root).spec.label_source
    # a dense store at T = 3 holds softmax(z / 3) of the teacher's logits on the stored crops
    labeler, _ = es.store_labeler(art.labels_root, art.images, "marginal_renorm")
    batch = labeler(art.images.images.float() / 255, art.images.targets, torch.arange(len(art.images)), 0, None)
    with torch.no_grad():
        want = (load_model(bn_teacher).eval()(batch.images) / 3).softmax(1)
    assert torch.allclose(batch.soft.probs, want, atol=2e-3)

    losses, train = [], es.train_student
    monkeypatch.setattr(es, "train_student", lambda *a: losses.append(a[-1]) or train(*a))
    es.eval_synth(res.root, progress=False, seeds=1, overrides=["full_data=false", "epochs=1"],
                  cache_dir=tmp_path / "cache")
    assert [(loss.kd, loss.temperature) for loss in losses] == [("kl", 3.0), ("kl", 3.0)]  # distilled, random
    assert "learnt by `kl`" in (res.root / "eval" / "report.md").read_text()

    older = yaml.safe_load(art.recipe_yaml)
    for key in ("loss", "temperature"):
        older["labels"]["relabel"].pop(key)
    legacy = es.relabel_config(dataclasses.replace(art, recipe_yaml=yaml.safe_dump(older)))
    assert (legacy.loss, legacy.temperature) == ("soft_ce", 1.0)


def test_a_new_dsa_revision_changes_every_cache_key(recipe, monkeypatch):
    """Chunks, artefacts and eval runs made with an older DSA must not be reused silently."""
    import synth.config
    import synth.eval_synth
    from synth.config import EvalConfig

    cfg = recipe()
    before = (cfg.hash(), cfg.synthesis_hash(), synth.eval_synth._protocol_hash(EvalConfig(), "convnet3"))
    monkeypatch.setattr(synth.config, "DSA_REVISION", 1)
    monkeypatch.setattr(synth.eval_synth, "DSA_REVISION", 1)
    after = (cfg.hash(), cfg.synthesis_hash(), synth.eval_synth._protocol_hash(EvalConfig(), "convnet3"))
    assert all(b != a for b, a in zip(before, after))
