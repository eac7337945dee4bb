"""No run is silently wrong or damaged: non-finite losses, refused resumes, bad data, unwritable
outputs and raw tracebacks (docs/errors.md)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from distill.artefacts import read_metadata
from distill.cli import main
from distill.config import DataConfig
from distill.data import load_data
from distill.errors import ArtefactError, ConfigError, DataError, TrainingError
from distill.models import create_model, save_model
from distill.recipe import parse_config
from distill.runner import train
from students import step as step_module
from teachers.source import SoftLabels

STEPS_PER_EPOCH = 3  # tiny_recipe: 96 images, batch 32


class Payload:
    """An arbitrary Python object in a checkpoint: loading it would run code."""


def poison(monkeypatch, at_calls: set[int], scale: float = float("nan")) -> None:
    """The training forward returns a non-finite loss on the given calls (counted from 1)."""
    original, calls = step_module.DistillStep.forward, [0]

    def forward(self, images, targets, soft=None):
        terms = original(self, images, targets, soft)
        if self.training:
            calls[0] += 1
            if calls[0] in at_calls:
                terms = {k: v * scale for k, v in terms.items()}
        return terms

    monkeypatch.setattr(step_module.DistillStep, "forward", forward)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_nan_loss_stops_keeps_the_last_checkpoint_and_resumes_after_a_fix(tiny_recipe, monkeypatch):
    raw = tiny_recipe("nan", trainer={"epochs": 3, "batch_size": 32})
    poison(monkeypatch, {STEPS_PER_EPOCH + 2})  # the 2nd step of epoch 2
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 2, step 2 of the epoch .*ce nan, loss nan") as e:
        train(parse_config(raw))
    assert "last good checkpoint" in str(e.value) and "after epoch 1" in str(e.value)
    run = Path(raw["out_dir"]) / "nan"
    assert read_metadata(run / "checkpoints" / "last.safetensors")["epochs_done"] == 1
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]  # strict JSON
    assert [r["epoch"] for r in rows] == [1] and not (run / "student.safetensors").exists()

    monkeypatch.undo()  # the cause is fixed; a resumable key changes on the way
    resumed = train(parse_config({**raw, "optim": {"lr": 0.02}}))
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3] and resumed.history[0] == rows[0]
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["lr"] == 0.02
    assert resumed.history[1]["lr"] <= 0.02 < rows[0]["lr"]  # the resumed epochs follow the new lr, not the checkpoint's


def test_refused_resume_changes_no_file(tiny_recipe):
    raw = tiny_recipe("refuse", trainer={"epochs": 1, "batch_size": 32})
    run = train(parse_config(raw)).run_dir
    before = snapshot(run)
    with pytest.raises(ArtefactError, match="written by a different recipe"):
        train(parse_config({**raw, "student": {"model": "test_resnet"}}))
    assert snapshot(run) == before


def test_skip_step_is_bounded_and_counted(tiny_recipe, monkeypatch):
    raw = tiny_recipe("skip", trainer={"epochs": 2, "batch_size": 32, "on_nonfinite": "skip_step",
                                       "max_skipped_steps": 1})
    poison(monkeypatch, {2})
    res = train(parse_config(raw))
    assert [r["skipped_steps"] for r in res.history] == [1, 1]
    poison(monkeypatch, {2, 4}, float("inf"))
    with pytest.raises(TrainingError, match="non-finite loss at epoch 2, step 1"):
        train(parse_config({**raw, "name": "skip2"}))


def test_nonfinite_gradient_with_a_finite_loss_stops(tiny_recipe, monkeypatch):
    original = step_module.DistillStep.forward

    def forward(self, images, targets, soft=None):
        terms = original(self, images, targets, soft)
        if self.training:  # a finite loss whose backward is NaN (sqrt at 0)
            terms["loss"] = terms["loss"] + torch.sqrt(torch.zeros((), requires_grad=True) * next(self.parameters()).sum())
        return terms

    monkeypatch.setattr(step_module.DistillStep, "forward", forward)
    with pytest.raises(TrainingError, match="non-finite gradient at epoch 1, step 1"):
        train(parse_config(tiny_recipe("grad")))


def test_a_batch_with_every_row_discarded_is_a_zero_not_a_nan():
    model = create_model("test_vit", 10, 1, 16, tuple(map(str, range(10))))
    from distill.config import LossConfig

    step = step_module.DistillStep(model, LossConfig())
    soft = SoftLabels(probs=torch.full((4, 10), 0.1), mask=torch.zeros(4, dtype=torch.bool))
    terms = step(torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.long), soft)
    terms["loss"].backward()
    assert terms["loss"].item() == 0.0 and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_cli_exit_codes_and_one_screen(tiny_recipe, tmp_path, monkeypatch, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe("cli")))
    poison(monkeypatch, {1})
    assert main(["train", str(recipe)]) == 3
    err = capsys.readouterr().err
    assert err.startswith("stopped: cli: non-finite loss at epoch 1, step 1") and "Traceback" not in err

    def boom(args):
        raise RuntimeError("an engine bug")

    monkeypatch.setattr("distill.cli.cmd_validate", boom)
    assert main(["validate", str(recipe)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("internal error: RuntimeError: an engine bug (full traceback in ")
    log = Path(err.split("full traceback in ")[1].split(")")[0])
    assert "Traceback" in log.read_text() and len(err.splitlines()) == 1


# ---------------------------------------------------------------- data that cannot be what the recipe says


def _npz(path: Path, **arrays) -> Path:
    base = {"x_train": np.zeros((6, 8, 8), np.uint8), "y_train": np.array([0, 1, 2] * 2),
            "x_test": np.zeros((3, 8, 8), np.uint8), "y_test": np.array([0, 1, 2])}
    np.savez(path, **{**base, **arrays})
    return path


def test_npz_non_finite_pixels_and_unseen_test_labels(tmp_path):
    nan = np.zeros((6, 8, 8), np.float32)
    nan[4, 1, 1] = np.nan
    with pytest.raises(DataError, match=r"x_train holds non-finite pixels .* index \[4\]"):
        load_data(DataConfig(source="npz", path=_npz(tmp_path / "a.npz", x_train=nan)))
    with pytest.raises(DataError, match=r"y_test holds label\(s\) \[3\] that y_train never contains"):
        load_data(DataConfig(source="npz", path=_npz(tmp_path / "b.npz", y_test=np.array([0, 1, 3]),
                                                      class_names=np.array(["a", "b", "c", "d"]))))


def _folder(root: Path, bad: bool = False, empty: bool = False) -> Path:
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(4):
                Image.fromarray(np.full((12, 10, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    if bad:
        (root / "train" / "dog" / "broken.png").write_bytes(b"not a png")
    if empty:
        (root / "train" / "fox").mkdir()
        (root / "val" / "fox").mkdir()
    return root


def test_imagefolder_empty_class_and_undecodable_files(tmp_path, tiny_recipe):
    with pytest.raises(DataError, match=r"class folder\(s\) \['fox'\] hold no images"):
        load_data(DataConfig(source="imagefolder", path=_folder(tmp_path / "e", empty=True), image_size=8))
    root = _folder(tmp_path / "b", bad=True)
    raw = tiny_recipe("bad", data={"source": "imagefolder", "path": str(root), "image_size": 8, "train_limit": None},
                      student={"model": "test_resnet"}, trainer={"epochs": 1, "batch_size": 3, "num_workers": 2})
    with pytest.raises(DataError, match=r"broken.png: cannot be decoded"):
        train(parse_config(raw))
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe)]) == 2  # raised in a loader worker, still one screen
    raw["data"]["on_bad_image"] = "skip"
    res = train(parse_config({**raw, "name": "skip"}))
    assert res.final["bad_images_skipped"] == 1 and "skipped (data.on_bad_image: skip): 1" in \
        (res.run_dir / "report.md").read_text()


# ---------------------------------------------------------------- outputs, checkpoints, validate


def test_unwritable_output_is_refused_before_compute(tiny_recipe, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(ArtefactError, match=r"out_dir: cannot write to .*a_file/sub"):
        train(parse_config(tiny_recipe("w", out_dir=str(blocker / "sub"))))


def test_checkpoints_that_do_not_fit_are_named_not_tracebacks(tmp_path):
    names = tuple(map(str, range(10)))
    other_arch = create_model("test_vit", 10, 1, 16, names).net.state_dict()
    torch.save(other_arch, tmp_path / "vit.pth")  # a plain state dict of another architecture
    with pytest.raises(ArtefactError, match=r"vit.pth: weights do not fit test_resnet for 10 classes, 1 channels"):
        create_model("test_resnet", 10, 1, 16, names, checkpoint=tmp_path / "vit.pth")
    convnet = create_model("convnet3", 3, 1, 16, ("a", "b", "c")).net.state_dict()  # engine arch: exact fit
    torch.save(convnet, tmp_path / "convnet3.pth")
    with pytest.raises(ArtefactError, match=r"convnet3.pth: weights do not fit convnet3 for 10 classes.*\(3, "):
        create_model("convnet3", 10, 1, 16, names, checkpoint=tmp_path / "convnet3.pth")

    torch.save({"weights": Payload()}, tmp_path / "unsafe.pt")
    with pytest.raises(ArtefactError, match="unsafe.pt: holds pickled Python objects .* safetensors") as e:
        create_model("test_resnet", 10, 1, 16, names, checkpoint=tmp_path / "unsafe.pt")
    assert "weights_only=False" not in str(e.value)


def test_validate_runs_the_jobs_preflight(tiny_recipe, tmp_path, capsys):
    ckpt = tmp_path / "three.safetensors"
    save_model(ckpt, create_model("test_vit", 3, 1, 16, ("a", "b", "c")))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe("v", pool={"teachers": [{"model": "test_vit", "checkpoint": str(ckpt)}]})))
    assert main(["validate", str(recipe), "--structure-only"]) == 0
    assert main(["validate", str(recipe)]) == 2
    assert "trained for 3 classes; the data has 10" in capsys.readouterr().err
    missing = _npz(tmp_path / "m.npz")
    np.savez(missing, x_train=np.zeros((2, 8, 8), np.uint8), y_train=np.array([0, 1]))
    recipe.write_text(yaml.safe_dump(tiny_recipe("v", data={"source": "npz", "path": str(missing), "train_limit": None})))
    assert main(["validate", str(recipe)]) == 2 and "missing arrays" in capsys.readouterr().err
    synth = Path(__file__).resolve().parent.parent / "configs" / "synth" / "digits_dm_ipc10.yaml"
    assert main(["validate", str(synth), "ipc=500"]) == 2
    assert "ipc: 500 but init.kind 'real' needs that many real images per class" in capsys.readouterr().err


def test_unknown_keys_name_the_allowed_ones_and_the_closest(tiny_recipe):
    with pytest.raises(ConfigError, match=r"trainer.epoch: unknown key; did you mean 'epochs'\? \(allowed here: .*batch_size"):
        parse_config(tiny_recipe(trainer={"epoch": 3}))


def test_timm_weights_with_another_head_load_through_timm(tmp_path):
    """A timm-format state dict with a 1000-class head → a 10-class model: head reset, backbone equal."""
    imagenet = create_model("test_resnet", 1000, 3, 32, tuple(map(str, range(1000)))).net.state_dict()
    torch.save(imagenet, tmp_path / "in1k.pth")
    model = create_model("test_resnet", 10, 3, 32, tuple(map(str, range(10))), checkpoint=tmp_path / "in1k.pth")
    own = model.net.state_dict()
    assert own["fc.weight"].shape == (10, imagenet["fc.weight"].shape[1])
    assert all(torch.equal(own[k], v) for k, v in imagenet.items() if not k.startswith("fc."))
    assert model.mean.flatten().tolist() == [0.5, 0.5, 0.5]  # test_resnet's pretrained_cfg mean
    grey = create_model("test_resnet", 10, 1, 32, tuple(map(str, range(10))), checkpoint=tmp_path / "in1k.pth")
    assert torch.allclose(grey.net.state_dict()["conv1.0.weight"], imagenet["conv1.0.weight"].sum(1, keepdim=True))
