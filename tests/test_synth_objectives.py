"""Tests for the dataset-condensation cores: synth/convnet.py, synth/augment.py, synth/objectives.py."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.convnet import ConvNet
from synth.augment import DSA, DSA_OPS, DSAParams
from synth.objectives import (bn_matching_loss, distribution_matching_loss, flip_concat, gradient_distance,
                              gradient_matching_loss, random_jitter)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --- ConvNet ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chans,size,feat", [(1, 28, 2048), (1, 32, 2048), (3, 32, 2048), (3, 28, 128 * 3 * 3)]
)
def test_convnet_shapes(chans, size, feat):
    net = ConvNet(chans, 10, size)
    x = torch.randn(2, chans, size, size)
    assert net.embed(x).shape == (2, feat)
    assert net(x).shape == (2, 10)


def test_convnet_matches_reference_layout():
    net = ConvNet(3, 10, 32)
    # ConvNet-3 on CIFAR-10 has 320,010 parameters in the DC/DM papers' code.
    assert sum(p.numel() for p in net.parameters()) == 320_010
    norms = [m for m in net.modules() if isinstance(m, nn.GroupNorm)]
    assert len(norms) == 3 and all(m.num_groups == m.num_channels == 128 for m in norms)


# --- flip_concat -----------------------------------------------------------------------------


def test_flip_concat_doubles_with_exact_mirrors():
    x = torch.randn(3, 2, 4, 5)
    y = torch.tensor([0, 1, 2])
    xx, yy = flip_concat(x, y)
    assert xx.shape == (6, 2, 4, 5)
    assert torch.equal(xx[:3], x)
    assert torch.equal(xx[3:, :, :, 0], x[:, :, :, -1])
    assert torch.equal(xx[3:], x[..., torch.arange(4, -1, -1)])
    assert yy.tolist() == [0, 1, 2, 0, 1, 2]
    assert flip_concat(x)[1] is None


# --- DSA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", DSA_OPS)
def test_dsa_siamese_same_params_same_transform(op):
    dsa = DSA(ops=(op,))
    x = torch.randn(4, 3, 16, 16)
    params = dsa.sample(gen(1))
    a, b = dsa.apply(x, params), dsa.apply(x.clone(), params)
    assert torch.equal(a, b)
    # one draw is shared by all images and by batches of another size
    assert torch.equal(dsa.apply(x[:1], params), a[:1])


def test_dsa_generator_seeds_and_per_image_draws():
    dsa = DSA()
    x = torch.randn(8, 3, 16, 16)
    assert torch.equal(dsa(x, gen(5)), dsa(x, gen(5)))
    params = dsa.sample(gen(2), n=8)
    assert all(d.shape[0] == 8 for d in params.draws.values())
    rotated = DSA(ops=("rotate",))(x[:1].expand(8, -1, -1, -1), gen(3))
    assert not torch.allclose(rotated[0], rotated[1])
    with pytest.raises(ValueError):
        dsa.apply(x[:3], params)
    with pytest.raises(ValueError):
        DSA(ops=("color", "jpeg"))


@pytest.mark.parametrize("op", DSA_OPS)
def test_dsa_is_differentiable(op):
    dsa = DSA(ops=(op,))
    params = dsa.sample(gen(7), n=2)
    x = torch.randn(2, 2, 6, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, params), (x,))


def test_dsa_all_ops_gradient_reaches_images():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    DSA(single=False).apply(x, DSA(single=False).sample(gen(0))).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dsa_op_semantics():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    flip = DSA(ops=("flip",), prob_flip=1.0)
    assert torch.equal(flip(x, gen()), x.flip(3))
    # crop: side 8, pad ratio 0.125 → shifts in [-1, 1]; draw 0.99 → +1: out[i] = x[i + 1], zero fill
    crop = DSA(ops=("crop",))
    out = crop.apply(x, DSAParams(("crop",), {"crop": torch.tensor([[0.99, 0.5]])}))
    assert torch.equal(out[0, 0, :7], x[0, 0, 1:]) and torch.equal(out[0, 0, 7], torch.zeros(8))
    # cutout: half the side → a 4x4 hole in an 8x8 image when centred inside
    holes = DSA(ops=("cutout",)).apply(torch.ones(1, 1, 8, 8), DSAParams(("cutout",), {"cutout": torch.tensor([[0.5, 0.5]])}))
    assert int((holes == 0).sum()) == 16
    no_flip = DSA(ops=("color", "crop", "cutout", "scale", "rotate"))
    assert "flip" not in no_flip.ops


# --- BN matching (SRe2L) ---------------------------------------------------------------------


def bn_model(num_bn: int = 2) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    if num_bn == 2:
        layers += [nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def set_running_stats_from(model: nn.Module, x: torch.Tensor) -> None:
    """Make every BN's running stats equal the batch statistics of its input, layer by layer."""

    def pre_hook(module, inputs):
        module.running_mean.copy_(inputs[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(inputs[0].var(dim=(0, 2, 3), unbiased=False))

    handles = [m.register_forward_pre_hook(pre_hook) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()


def test_bn_term_zero_when_stats_match_and_terms_add_up():
    torch.manual_seed(0)
    model, x, y = bn_model(), torch.randn(16, 3, 8, 8), torch.randint(0, 4, (16,))
    set_running_stats_from(model, x)
    out = bn_matching_loss(model, x, y)
    assert set(out) == {"loss", "ce", "bn"}
    assert out["bn"].item() < 1e-5
    assert torch.allclose(out["loss"], out["ce"] + 0.01 * out["bn"])
    assert all(not m._forward_hooks for m in model.modules())


def test_bn_layer_weights():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 8, 8), torch.zeros(16, dtype=torch.long)
    two = bn_model(2)
    set_running_stats_from(two, x)
    two[4].running_mean[0] += 1.0  # last BN off by a unit vector: weight 1
    assert bn_matching_loss(two, x, y)["bn"].item() == pytest.approx(1.0, abs=1e-4)
    one = bn_model(1)
    set_running_stats_from(one, x)
    one[1].running_mean[0] += 1.0  # first BN: weight first_bn_weight
    assert bn_matching_loss(one, x, y)["bn"].item() == pytest.approx(10.0, abs=1e-3)
    assert bn_matching_loss(one, x, y, first_bn_weight=3.0)["bn"].item() == pytest.approx(3.0, abs=1e-3)


def test_bn_adam_steps_lower_the_term():
    torch.manual_seed(0)
    model = bn_model()
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(0.5)
            m.running_var.fill_(2.0)
    images = torch.randn(8, 3, 8, 8, requires_grad=True)
    targets = torch.arange(8) % 4
    opt = torch.optim.Adam([images], lr=0.1, betas=(0.5, 0.9))
    first = bn_matching_loss(model, images, targets, r_bn=1.0)["bn"].item()
    for _ in range(20):
        opt.zero_grad()
        bn_matching_loss(model, random_jitter(images, gen(_), max_shift=2), targets, r_bn=1.0)["loss"].backward()
        opt.step()
    assert bn_matching_loss(model, images, targets, r_bn=1.0)["bn"].item() < 0.5 * first


def test_bn_matching_errors_name_the_model():
    with pytest.raises(ValueError, match="ConvNet"):
        bn_matching_loss(ConvNet(3, 4, 8, width=4, depth=1), torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="eval"):
        bn_matching_loss(bn_model().train(), torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))


# --- DM --------------------------------------------------------------------------------------


def test_dm_hand_value():
    embed = lambda t: t.flatten(1)  # noqa: E731
    real = [torch.tensor([[0.0, 0.0], [2.0, 2.0]]).view(2, 2, 1, 1)]
    syn = [torch.zeros(1, 2, 1, 1)]
    assert distribution_matching_loss(embed, real, syn).item() == pytest.approx(2.0)


def test_dm_zero_for_identical_positive_otherwise():
    torch.manual_seed(0)
    net = ConvNet(3, 3, 16, width=16)
    for p in net.parameters():
        p.requires_grad_(False)
    real = [torch.randn(5, 3, 16, 16) for _ in range(3)]
    same = [r.clone().requires_grad_() for r in real]
    assert distribution_matching_loss(net.embed, real, same).item() == pytest.approx(0.0, abs=1e-10)
    assert distribution_matching_loss(net.embed, real, same, dsa=DSA(), generator=gen(0)).item() == pytest.approx(0.0, abs=1e-10)
    syn = [torch.randn(2, 3, 16, 16, requires_grad=True) for _ in range(3)]
    loss = distribution_matching_loss(net.embed, real, syn, dsa=DSA(), generator=gen(1))
    assert loss.item() > 0
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in syn)


# --- gradient matching (DC / DSA) ------------------------------------------------------------


def test_gradient_distance_hand_value():
    g_syn = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([5.0, -5.0])]
    g_real = [torch.tensor([[2.0, 0.0], [3.0, 0.0]]), torch.tensor([1.0, 1.0])]
    # rows: cos 1 → 0, cos 0 → 1; 1-D tensors (biases) contribute nothing, as in the reference
    assert gradient_distance(g_syn, g_real).item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_matching_zero_for_identical_and_flows_to_images(device):
    torch.manual_seed(0)
    net = ConvNet(3, 4, 16, width=16).to(device)
    x = torch.randn(8, 3, 16, 16, device=device)
    y = torch.arange(8, device=device) % 4
    same = gradient_matching_loss(net, x, y, x.clone().requires_grad_(), y)
    assert same.item() < 1e-2  # only the reference's eps in the cosine keeps it off exact 0
    syn = torch.randn(4, 3, 16, 16, device=device, requires_grad=True)
    loss = gradient_matching_loss(net, x, y, syn, y[:4], dsa=DSA(), generator=gen(0))
    assert loss.item() > 1.0 and loss.device.type == device
    loss.backward()
    assert syn.grad is not None and syn.grad.abs().sum() > 0


def test_gradient_matching_with_flip_concat_and_missing_class():
    net = ConvNet(1, 3, 8, width=8, depth=2)
    real_x, real_y = torch.randn(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    syn_x, syn_y = flip_concat(torch.randn(3, 1, 8, 8, requires_grad=True), torch.tensor([0, 1, 2]))
    assert gradient_matching_loss(net, real_x, real_y, syn_x, syn_y).item() > 0
    with pytest.raises(ValueError, match="class 2"):
        gradient_matching_loss(net, real_x[:4], real_y[:4], syn_x, syn_y)


# --- jitter ----------------------------------------------------------------------------------


def test_random_jitter():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert torch.equal(random_jitter(x, gen(), max_shift=0, flip=False), x)
    a = random_jitter(x, gen(4), crop_scale=(0.5, 1.0))
    assert a.shape == x.shape and torch.equal(a, random_jitter(x, gen(4), crop_scale=(0.5, 1.0)))
    a.sum().backward()
    assert x.grad is not None
