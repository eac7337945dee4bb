import pytest
import torch

from distill.artefacts import load_tensors, read_jsonl
from distill.recipe import parse_config
from distill.runner import train
from students.trainer import Trainer


def _weights(run_dir):
    return load_tensors(run_dir / "student.safetensors")[0]


def test_kill_and_resume_matches_uninterrupted(tiny_recipe, tmp_path, monkeypatch):
    full = train(parse_config(tiny_recipe("full", trainer={"epochs": 3})))

    calls = {"n": 0}
    original = Trainer.save_checkpoint

    def crash_after_two(self, epochs_done):
        original(self, epochs_done)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")

    raw = tiny_recipe("killed", trainer={"epochs": 3})
    monkeypatch.setattr(Trainer, "save_checkpoint", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(raw))
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    run_dir = tmp_path / "runs" / "killed"
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert not (run_dir / "student.safetensors").exists()

    resumed = train(parse_config(raw))
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3]
    a, b = _weights(full.run_dir), _weights(resumed.run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.history[-1]["test_top1"] == full.history[-1]["test_top1"]


def test_resume_refuses_a_different_recipe(tiny_recipe):
    from distill.artefacts import ArtefactError

    train(parse_config(tiny_recipe("r", trainer={"epochs": 1})))
    with pytest.raises(ArtefactError, match="different recipe"):
        train(parse_config(tiny_recipe("r", trainer={"epochs": 1}, optim={"momentum": 0.5})))


def test_meal_v2_student_trains_with_discriminator(tiny_recipe):
    teacher = train(parse_config(tiny_recipe("t", trainer={"epochs": 1})))
    ckpt = str(teacher.run_dir / "student.safetensors")
    res = train(parse_config(tiny_recipe(
        "s", pool={"teachers": [{"model": "test_vit", "checkpoint": ckpt, "name": "a"},
                                {"model": "test_vit", "checkpoint": ckpt, "name": "b"}]},
        loss={"discriminator": "adversarial", "discriminator_final_relu": False}, trainer={"epochs": 1})))
    last = res.history[-1]
    assert {"train_kd", "train_disc", "train_gen", "train_loss"} <= last.keys()
    assert res.final["teacher_queries_by_teacher"] == {"a": 96, "b": 96}
    assert (res.run_dir / "report.md").exists() and (res.run_dir / "curves.png").exists()


def test_evaluate_runs_the_forward_in_the_run_precision():
    """bf16 evaluation autocasts the forward (as timm's validate --amp) and scores in fp32."""
    from distill.data import ImageSet
    from students.accuracy import evaluate

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.is_autocast_enabled("cpu"), x.is_contiguous(memory_format=torch.channels_last)))
            return torch.nn.functional.one_hot(torch.zeros(len(x), dtype=torch.long), 3).to(torch.bfloat16)

    data = ImageSet(torch.zeros(4, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 0, 1, 2]), ("a", "b", "c"))
    assert evaluate(Probe(), data, precision="bf16", channels_last=True)["top1"] == 50.0
    assert evaluate(Probe(), data)["top1"] == 50.0
    assert seen == [(True, True), (False, False)]


def test_compiled_student_gives_the_same_loss_and_gradients(tiny_recipe):
    """trainer.compile: true (torch.compile of the student) gives the eager step's loss terms and
    gradients on a fixed batch, within float tolerance, and keeps the checkpoint keys."""
    from distill.data import load_data
    from students.build import create_step
    from teachers.source import SoftLabels

    steps = []
    for compiled in (False, True):
        cfg = parse_config(tiny_recipe(student={"model": "test_resnet"}, trainer={"compile": compiled},
                                       pool={"teachers": [{"model": "test_vit"}]},
                                       loss={"kd": "kl", "temperature": 4.0, "hard_ce": 0.5}))
        train_set, _ = load_data(cfg.data)
        steps.append(create_step(cfg, train_set))
    images, targets = train_set.images[:24].float() / 255, train_set.targets[:24]
    soft = SoftLabels(probs=torch.softmax(torch.randn(24, 10, generator=torch.Generator().manual_seed(0)), 1))
    terms, grads = [], []
    for step in steps:
        step.train()
        out = step(images, targets, soft)
        out["loss"].backward()
        terms.append({k: v.item() for k, v in out.items()})
        grads.append(torch.cat([p.grad.flatten() for p in step.parameters() if p.grad is not None]))
    assert terms[0].keys() == terms[1].keys() and {"loss", "kd", "ce"} <= terms[0].keys()
    assert terms[1] == pytest.approx(terms[0], rel=1e-4, abs=1e-5)
    assert torch.allclose(grads[1], grads[0], rtol=1e-3, atol=1e-5)
    assert set(steps[1].student.state_dict()) == set(steps[0].student.state_dict())


def test_channels_last_puts_weights_in_channels_last_on_the_plain_backend_only(tiny_recipe):
    """data.loader.channels_last: the plain backend's student weights go channels_last; under
    DeepSpeed they stay contiguous (its start-up broadcast views each weight as bytes, which fails
    on channels_last strides) and only the batches are converted."""
    from distill.data import load_data
    from students.build import create_student

    def conv_weights(**trainer):
        cfg = parse_config(tiny_recipe(student={"model": "test_resnet"}, data={"loader": {"channels_last": True}},
                                       trainer=trainer))
        model = create_student(cfg, load_data(cfg.data)[0])
        return [p for p in model.parameters() if p.dim() == 4]

    plain, ds = conv_weights(), conv_weights(backend="deepspeed")
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in plain)
    assert any(not p.is_contiguous() for p in plain) and all(p.is_contiguous() for p in ds)
