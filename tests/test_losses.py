import math

import pytest
import torch

from students.losses import OutputDiscriminator, discriminator_loss, generator_loss, hard_ce, kd_kl, soft_ce


def test_golden_values():
    z = torch.tensor([[2.0, 0.0, -1.0]])
    p = torch.tensor([[0.7, 0.2, 0.1]])
    log_q = z.log_softmax(1)
    assert math.isclose(soft_ce(z, p).item(), -(p * log_q).sum().item(), rel_tol=1e-6)
    assert math.isclose(soft_ce(z, p).item(), 0.8699, abs_tol=1e-4)  # lse = 2.1699 → .7(.1699)+.2(2.1699)+.1(3.1699)
    # KL = CE - H(p) at T = 1
    h = -(p * p.log()).sum().item()
    assert math.isclose(kd_kl(z, p).item(), soft_ce(z, p).item() - h, rel_tol=1e-5)
    assert kd_kl(z, z.softmax(1)).abs().item() < 1e-6
    assert math.isclose(hard_ce(z, torch.tensor([0])).item(), -log_q[0, 0].item(), rel_tol=1e-6)
    # temperature scaling: T² KL(p_T || softmax(z/T))
    t = 4.0
    pt = (z * 0.5).div(t).softmax(1)
    ref = (pt * (pt.log() - (z / t).log_softmax(1))).sum() * t * t
    assert math.isclose(kd_kl(z, pt, t).item(), ref.item(), rel_tol=1e-5)


def test_discriminator_shapes_follow_reference():
    d = OutputDiscriminator(1000)
    convs = [m for m in d.layers if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [125, 15, 2]
    assert d(torch.randn(4, 1000)).shape == (4, 2)


def test_discriminator_learns_to_separate_and_generator_moves_student_toward_teacher():
    torch.manual_seed(0)
    d = OutputDiscriminator(10, final_relu=False)
    teacher = torch.randn(64, 10) * 3 + torch.arange(10.0)
    student = torch.randn(64, 10)
    opt = torch.optim.SGD(d.parameters(), lr=0.05)
    before = discriminator_loss(d, student, teacher).item()
    for _ in range(100):
        loss = discriminator_loss(d, student, teacher)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = discriminator_loss(d, student, teacher).item()
    assert after < before - 0.1
    # once D separates them, the generator loss pushes student logits toward the teacher side
    s = student.clone().requires_grad_(True)
    g0 = generator_loss(d, s)
    g0.backward()
    moved = (s - 1.0 * s.grad).detach()
    assert generator_loss(d, moved).item() < g0.item()


def test_reference_final_relu_can_die_at_ln2():
    d = OutputDiscriminator(10)
    with torch.no_grad():
        d.layers[4].bias.fill_(-100.0)  # both final units dead
    z = torch.randn(8, 10, requires_grad=True)
    loss = discriminator_loss(d, z, torch.randn(8, 10))
    loss.backward()
    assert math.isclose(loss.item(), math.log(2), rel_tol=1e-6) and z.grad.abs().sum() == 0


def test_soft_ce_with_a_temperature_is_refused_at_load(tiny_recipe):
    """soft_ce softens the teacher only; at T != 1 the recipe names kl (Hinton, both softened)."""
    from distill.errors import ConfigError
    from distill.recipe import parse_config

    with pytest.raises(ConfigError, match=r"loss.kd soft_ce takes loss.temperature 1.*loss.kd: kl"):
        parse_config(tiny_recipe(loss={"kd": "soft_ce", "temperature": 4.0}))
    assert parse_config(tiny_recipe(loss={"kd": "kl", "temperature": 4.0})).loss.temperature == 4.0
    assert parse_config(tiny_recipe(loss={"kd": "soft_ce", "temperature": 1.0})).loss.kd == "soft_ce"


def test_discriminator_group_follows_the_student_lr_by_default():
    """MEAL V2's train.py sets every parameter group's lr each epoch: D trains at the student's lr."""
    from distill.config import LossConfig, OptimConfig
    from distill.models import create_model
    from students.backends import PlainBackend, lr_factor
    from students.step import DistillStep

    optim = OptimConfig(lr=0.05, schedule="step", milestones=[1], gamma=0.1)

    def lrs(loss: LossConfig) -> dict[str, float]:
        step = DistillStep(create_model("test_vit", 10, 1, 16, tuple("0123456789")), loss)
        backend = PlainBackend(step, step.param_groups(optim.lr), optim, "fp32", torch.device("cpu"))
        backend.set_lr(lr_factor(optim, 1, 2))  # the trainer's scheduler step into epoch 2
        return {g["name"]: g["lr"] for g in backend.optimizer.param_groups}

    assert LossConfig().discriminator_lr == "follow_student"
    assert lrs(LossConfig(discriminator="joint")) == pytest.approx({"student": 0.005, "discriminator": 0.005})
    # a number (older recipes: discriminator_lr: 1.0e-4) keeps its own base lr, under the same schedule
    assert lrs(LossConfig(discriminator="joint", discriminator_lr=1e-4)) == pytest.approx(
        {"student": 0.005, "discriminator": 1e-5})
