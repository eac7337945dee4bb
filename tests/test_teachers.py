import torch

from distill.config import ModelConfig
from distill.models import create_model, load_model, save_model
from teachers import EnsemblePool, Teacher, create_teacher

NAMES = tuple("0123456789")


def test_teacher_from_saved_checkpoint_gives_identical_logits(tmp_path):
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, 1, 16, NAMES, mean=(0.3,), std=(0.2,))
    path = tmp_path / "t.safetensors"
    save_model(path, model)
    x = torch.rand(5, 1, 16, 16)
    teacher = create_teacher(ModelConfig(model="test_resnet", checkpoint=path), 10, 1, 16, NAMES)
    assert torch.equal(teacher.logits(x), model.eval()(x))
    assert teacher.cfg()["mean"] == [0.30000001192092896] and not any(p.requires_grad for p in teacher.model.parameters())
    assert load_model(path).class_names == NAMES


def test_teacher_adapts_channels_and_size():
    t = Teacher("t", create_model("test_vit", 10, 3, 32, NAMES))
    assert t.logits(torch.rand(2, 1, 16, 16)).shape == (2, 10)  # grey 16 px → RGB 32 px inside


def test_ensemble_is_mean_of_teacher_softmax_and_counts_queries():
    torch.manual_seed(0)
    ts = [Teacher(n, create_model(m, 10, 1, 16, NAMES)) for n, m in (("a", "test_vit"), ("b", "test_resnet"))]
    pool = EnsemblePool(ts)
    x = torch.rand(6, 1, 16, 16)
    soft = pool.soft_labels(x)
    za, zb = ts[0].logits(x), ts[1].logits(x)
    assert torch.allclose(soft.probs, (za.softmax(1) + zb.softmax(1)) / 2, atol=1e-6)
    assert torch.allclose(soft.logits, (za + zb) / 2, atol=1e-6)
    assert torch.allclose(soft.probs.sum(1), torch.ones(6))
    pool.soft_labels(x[:2])
    assert pool.cost.queries == {"a": 8, "b": 8} and pool.cost.total_queries == 16
    assert all(s > 0 for s in pool.cost.seconds.values())
    weighted = EnsemblePool(ts, weights=[3, 1]).soft_labels(x)
    assert torch.allclose(weighted.probs, 0.75 * za.softmax(1) + 0.25 * zb.softmax(1), atol=1e-6)


def test_bf16_teacher_labels_close_to_fp32():
    """Teachers under bf16 autocast + channels_last (this CPU runs bf16 natively): soft labels within
    0.03 of fp32 per class probability, the same top-1 on ≥ 90% of images."""
    torch.manual_seed(0)
    model = create_model("test_resnet", 10, 1, 32, tuple(map(str, range(10))))
    images = torch.rand(64, 1, 32, 32)
    fp32 = Teacher("t", model).logits(images).softmax(-1)
    bf16 = Teacher("t", model).configure("bf16", channels_last=True).logits(images).softmax(-1)
    assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().max() < 0.03
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.9


def test_teacher_features_run_in_the_teacher_precision():
    """Features (multi-source weighting, HeLlO heads) go through the same bf16 pass as logits."""
    from teachers.pool import teacher_features

    torch.manual_seed(0)
    model = create_model("test_resnet", 10, 1, 32, tuple(map(str, range(10))))
    images = torch.rand(16, 1, 32, 32)
    fp32 = teacher_features(Teacher("t", model), images)
    bf16 = teacher_features(Teacher("t", model).configure("bf16", channels_last=True), images)
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, fp32)
    assert torch.allclose(bf16, fp32, atol=0.1, rtol=0.05)


def test_compiled_teacher_gives_the_same_labels():
    torch.manual_seed(0)
    model = create_model("test_vit", 10, 1, 16, tuple(map(str, range(10))))
    images = torch.rand(8, 1, 16, 16)
    eager = Teacher("t", model).logits(images)
    compiled = Teacher("t", create_model("test_vit", 10, 1, 16, tuple(map(str, range(10))))).configure(compile=True)
    compiled.model.load_state_dict(model.state_dict())
    assert torch.allclose(compiled.logits(images), eager, atol=1e-4)
    assert set(compiled.model.state_dict()) == set(model.state_dict())  # checkpoints keep their keys


def test_pretrained_hub_weights_fail_clearly_offline(tmp_path):
    import subprocess
    import sys

    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "hub", "out_dir": str(tmp_path), "data": {"source": "digits", "image_size": 16},
                                      "student": {"model": "test_resnet", "pretrained": True}, "trainer": {"epochs": 1}}))
    r = subprocess.run([sys.executable, "-m", "distill.cli", "train", str(recipe)], capture_output=True, text=True,
                       env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert r.returncode == 2 and "pretrained weights could not be downloaded" in r.stderr
    assert "checkpoint: PATH" in r.stderr and "Traceback" not in r.stderr
