"""Tests for the dataset-condensation cores: distill/convnet.py, synth/augment.py, synth/objectives.py, and
one DM / GM iteration of synth/distribution_matching.py, synth/gradient_matching.py pinned against the
reference's plain per-class loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.convnet import ConvNet
from distill.data import ImageSet
from synth.augment import DSA, DSA_OPS, DSAParams
from synth.distribution_matching import DistributionMatching, DMOptions
from synth.gradient_matching import GMOptions, GradientMatching
from synth.init import class_indices
from synth.methods import SynthContext, data_stats
from synth.objectives import (bn_matching_loss, distribution_matching_loss, flip_concat, gradient_distance,
                              gradient_matching_loss, random_jitter)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def DSA0(**kw) -> DSA:  # noqa: N802
    """DSA on tensors that are already normalised (mean 0, std 1)."""
    return DSA(mean=(0.0,), std=(1.0,), **kw)


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
    dsa = DSA0(ops=(op,))
    x = torch.randn(4, 3, 16, 16)
    params = dsa.sample(gen(1))
    a, b = dsa.apply(x, params), dsa.apply(x.clone(), params)
    assert torch.equal(a, b)
    # one draw is shared by all images and by batches of another size
    assert torch.equal(dsa.apply(x[:1], params), a[:1])


def test_dsa_generator_seeds_and_per_image_draws():
    dsa = DSA0()
    x = torch.randn(8, 3, 16, 16)
    assert torch.equal(dsa(x, gen(5)), dsa(x, gen(5)))
    params = dsa.sample(gen(2), n=8)
    assert all(d.shape[0] == 8 for d in params.draws.values())
    rotated = DSA0(ops=("rotate",))(x[:1].expand(8, -1, -1, -1), gen(3))
    assert not torch.allclose(rotated[0], rotated[1])
    with pytest.raises(ValueError):
        dsa.apply(x[:3], params)
    with pytest.raises(ValueError):
        DSA0(ops=("color", "jpeg"))


@pytest.mark.parametrize("op", DSA_OPS)
def test_dsa_is_differentiable(op):
    dsa = DSA0(ops=(op,))
    params = dsa.sample(gen(7), n=2)
    x = torch.randn(2, 2, 6, 6, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: dsa.apply(t, params), (x,))


def test_dsa_all_ops_gradient_reaches_images():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    DSA0(mode="all").apply(x, DSA0(mode="all").sample(gen(0))).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_dsa_op_semantics():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    flip = DSA0(ops=("flip",), prob_flip=1.0)
    assert torch.equal(flip(x, gen()), x.flip(3))
    # crop: side 8, pad ratio 0.125 → shifts in [-1, 1]; draw 0.99 → +1: out[i] = x[i + 1], zero fill
    crop = DSA0(ops=("crop",))
    out = crop.apply(x, DSAParams(("crop",), {"crop": torch.tensor([[0.99, 0.5]])}))
    assert torch.equal(out[0, 0, :7], x[0, 0, 1:]) and torch.equal(out[0, 0, 7], torch.zeros(8))
    # cutout: half the side → a 4x4 hole in an 8x8 image when centred inside
    holes = DSA0(ops=("cutout",)).apply(torch.ones(1, 1, 8, 8), DSAParams(("cutout",), {"cutout": torch.tensor([[0.5, 0.5]])}))
    assert int((holes == 0).sum()) == 16
    no_flip = DSA0(ops=("color", "crop", "cutout", "scale", "rotate"))
    assert "flip" not in no_flip.ops


MEAN, STD = torch.tensor([0.2, 0.4, 0.6]), torch.tensor([0.1, 0.2, 0.3])


def test_dsa_brightness_is_half_a_std_in_pixel_space():
    """The reference's brightness ± 0.5 acts on normalised tensors: in [0, 1] pixels it is ± half a
    std of each channel (augmenting the pixels themselves shifted every channel by 0.5)."""
    x = torch.rand(2, 3, 8, 8)
    brightest = DSAParams(("color",), {"color": torch.tensor([[1.0, 0.5, 0.5]])})  # saturation, contrast x1
    out = DSA(mean=MEAN, std=STD, ops=("color",)).apply(x, brightest)
    assert torch.allclose(out - x, (0.5 * STD).view(1, 3, 1, 1).expand_as(x), atol=1e-6)


@pytest.mark.parametrize("op", ["crop", "cutout", "scale", "rotate"])
def test_dsa_fill_is_the_dataset_mean(op):
    """Every zero fill of the reference is 0 in normalised space, i.e. the dataset mean (not black):
    an image equal to the mean stays the mean under any geometric op, and a cutout hole holds it."""
    dsa = DSA(mean=MEAN, std=STD, ops=(op,))
    mean_image = MEAN.view(1, 3, 1, 1).expand(4, 3, 12, 12)
    assert torch.allclose(dsa(mean_image, gen(3)), mean_image, atol=1e-6)
    corner = DSAParams(("crop",), {"crop": torch.tensor([[0.99, 0.99]])})  # shift by +2 rows, +2 cols
    shifted = DSA(mean=MEAN, std=STD, ops=("crop",)).apply(torch.ones(1, 3, 12, 12), corner)
    assert torch.allclose(shifted[0, :, -1, :], MEAN.view(3, 1).expand(3, 12))
    hole = DSAParams(("cutout",), {"cutout": torch.tensor([[0.5, 0.5]])})
    cut = DSA(mean=MEAN, std=STD, ops=("cutout",)).apply(torch.ones(1, 3, 12, 12), hole)
    assert torch.allclose(cut[0, :, 6, 6], MEAN)


def test_dsa_flip_then_one_is_fyi_draw():
    """FYI's DiffAugment: the random flip always runs first, then one op drawn from the others."""
    dsa = DSA0(mode="flip_then_one")
    drawn = [dsa.sample(gen(k)).ops for k in range(60)]
    assert all(len(ops) == 2 and ops[0] == "flip" and ops[1] != "flip" for ops in drawn)
    assert {ops[1] for ops in drawn} == set(DSA_OPS) - {"flip"}
    assert all(len(DSA0().sample(gen(k)).ops) == 1 for k in range(10))  # plain 'single': one op
    x = torch.arange(16.0).view(1, 1, 4, 4)
    crop = {"crop": torch.tensor([[0.5, 0.99]])}
    flip_crop = DSAParams(("flip", "crop"), {"flip": torch.tensor([[0.0]])} | crop)  # flip drawn: 0 < 0.5
    assert torch.equal(dsa.apply(x, flip_crop), dsa.apply(x.flip(3), DSAParams(("crop",), crop)))
    with pytest.raises(ValueError, match="flip_then_one"):
        DSA0(ops=("color", "crop"), mode="flip_then_one")


def test_dsa_mode_reachable_from_options():
    assert DMOptions.model_validate({"dsa_mode": "flip_then_one"}).dsa_mode == "flip_then_one"
    assert DMOptions().dsa_mode == "single"
    with pytest.raises(ValueError, match="flip_then_one"):
        GMOptions.model_validate({"dsa_mode": "flip_then_one", "dsa_ops": ["color", "crop"]})


def test_eval_students_can_train_with_fyis_dsa_draw():
    """FYI's evaluate_synset trains with the DiffAugment it synthesises with (flip, then one op):
    `eval.dsa_mode` reaches the students' DSA, is checked like the methods' option, and changes the
    eval runs' cache key only when it is not the default."""
    from synth.config import EvalConfig
    from synth.eval_synth import _protocol_hash, protocol_views

    norm = (torch.tensor([0.5]), torch.tensor([0.25]))
    assert protocol_views(EvalConfig(dsa_mode="flip_then_one"), norm).mode == "flip_then_one"
    assert protocol_views(EvalConfig(), norm).mode == "single"
    with pytest.raises(ValueError, match="flip_then_one needs 'flip'"):
        EvalConfig(dsa_mode="flip_then_one", dsa_ops=["color", "crop"])
    base = _protocol_hash(EvalConfig(), "convnet3")
    assert _protocol_hash(EvalConfig(dsa_mode="flip_then_one"), "convnet3") != base
    assert base == "0af1b2179281"  # the default protocol's key from before `dsa_mode` existed: cached runs hold


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
    assert distribution_matching_loss(net.embed, real, same, dsa=DSA0(), generator=gen(0)).item() == pytest.approx(0.0, abs=1e-10)
    syn = [torch.randn(2, 3, 16, 16, requires_grad=True) for _ in range(3)]
    loss = distribution_matching_loss(net.embed, real, syn, dsa=DSA0(), generator=gen(1))
    assert loss.item() > 0
    loss.backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in syn)


# --- gradient matching (DC / DSA) ------------------------------------------------------------


def test_gradient_distance_hand_value():
    g_syn = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([5.0, -5.0])]
    g_real = [torch.tensor([[2.0, 0.0], [3.0, 0.0]]), torch.tensor([1.0, 1.0])]
    # rows: cos 1 → 0, cos 0 → 1; 1-D tensors (biases) contribute nothing, as in the reference
    assert gradient_distance(g_syn, g_real).item() == pytest.approx(1.0, abs=1e-6)


def by_class(x: torch.Tensor, y: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
    classes = sorted(set(y.tolist()))
    return classes, [x[y == c] for c in classes]


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_matching_zero_for_identical_and_flows_to_images(device):
    torch.manual_seed(0)
    net = ConvNet(3, 4, 16, width=16).to(device)
    x = torch.randn(8, 3, 16, 16, device=device)
    y = torch.arange(8, device=device) % 4
    classes, real = by_class(x, y)
    same = gradient_matching_loss(net, classes, real, [r.clone().requires_grad_() for r in real])
    assert same.item() < 1e-2  # only the reference's eps in the cosine keeps it off exact 0
    syn = torch.randn(4, 3, 16, 16, device=device, requires_grad=True)
    loss = gradient_matching_loss(net, classes, real, list(syn.split(1)), dsa=DSA0(), generator=gen(0))
    assert loss.item() > 1.0 and loss.device.type == device
    loss.backward()
    assert syn.grad is not None and syn.grad.abs().sum() > 0


def test_gradient_matching_with_flip_concat_and_missing_class():
    net = ConvNet(1, 3, 8, width=8, depth=2)
    real_x, real_y = torch.randn(6, 1, 8, 8), torch.tensor([0, 0, 1, 1, 2, 2])
    syn_x, syn_y = flip_concat(torch.randn(3, 1, 8, 8, requires_grad=True), torch.tensor([0, 1, 2]))
    classes, real = by_class(real_x, real_y)
    assert gradient_matching_loss(net, classes, real, by_class(syn_x, syn_y)[1]).item() > 0
    with pytest.raises(ValueError, match="class 2"):
        gradient_matching_loss(net, classes, real[:2] + [real_x[:0]], by_class(syn_x, syn_y)[1])


# --- jitter ----------------------------------------------------------------------------------


def test_random_jitter():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert torch.equal(random_jitter(x, gen(), max_shift=0, flip=False), x)
    a = random_jitter(x, gen(4), crop_scale=(0.5, 1.0))
    assert a.shape == x.shape and torch.equal(a, random_jitter(x, gen(4), crop_scale=(0.5, 1.0)))
    a.sum().backward()
    assert x.grad is not None


# --- one DM / GM iteration against the reference's plain per-class loop ------------------------


def tiny_context(ipc: int = 2) -> SynthContext:
    torch.manual_seed(0)
    images = (torch.rand(60, 1, 12, 12) * 255).to(torch.uint8)
    real = ImageSet(images, torch.arange(60) % 3, ("a", "b", "c"))
    mean, std = data_stats(real, 0)
    return SynthContext(real, class_indices(real), [], mean, std, torch.device("cpu"), ipc, 0)


def plain_embed(model):
    """The network in the default layout, embedding [0, 1] images."""
    model = model.to(memory_format=torch.contiguous_format)
    return lambda t: model.net.embed(model.preprocess(t))


def test_dm_iteration_equals_plain_per_class_loop():
    """Batched classes, micro-batches and channels_last give the reference's loss and gradient:
    per class, one siamese draw, real and synthetic embedded on their own (main_DM.py 149-163)."""
    ctx, opts = tiny_context(), DMOptions(batch_real=18, micro_batch=4)
    x = torch.rand(6, 1, 12, 12, requires_grad=True)
    y = torch.arange(3).repeat_interleave(2)
    loss = DistributionMatching(opts, ctx).loss(x, y, 0, gen(5))["loss"]
    (grad,) = torch.autograd.grad(loss, x)

    g = gen(5)
    embed = plain_embed(ctx.random_network(opts.net, g).train().requires_grad_(False))
    real = [ctx.real_batch(c, opts.batch_real, g) for c in range(3)]
    dsa, plain = DSA(mean=ctx.mean, std=ctx.std), x.new_zeros(())
    for c in range(3):
        p = dsa.sample(g)
        real_mean = embed(dsa.apply(real[c], p)).detach().mean(dim=0)
        plain = plain + ((real_mean - embed(dsa.apply(x[y == c], p)).mean(dim=0)) ** 2).sum()
    (plain_grad,) = torch.autograd.grad(plain, x)
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5)
    assert (grad - plain_grad).abs().max() <= 1e-5 * plain_grad.abs().max()


def test_gm_iterations_equal_plain_per_class_loop():
    """Step 0 (fresh network) and step 1 (after an inner-loop epoch) of gradient matching against
    the reference's loop (main.py 179-199 and its inner `epoch`), without micro-batches."""
    ctx = tiny_context()
    opts = GMOptions(batch_real=18, micro_batch=4, outer_loop=2, inner_loop=1)
    x = torch.rand(6, 1, 12, 12, requires_grad=True)
    y = torch.arange(3).repeat_interleave(2)
    method, g = GradientMatching(opts, ctx), gen(7)
    ours, grads = [], []
    for step in (0, 1):  # each step's gradient before the next changes the network, as in synth.run
        loss = method.loss(x, y, step, g)["loss"]
        ours.append(loss.detach())
        grads.append(torch.autograd.grad(loss, x)[0])

    g, dsa = gen(7), DSA(mean=ctx.mean, std=ctx.std)
    net = ctx.random_network(opts.net, g).train().to(memory_format=torch.contiguous_format)
    params = list(net.parameters())
    net_opt = torch.optim.SGD(params, lr=opts.lr_net)
    for step in (0, 1):
        if step == 1:  # one inner epoch: the whole synthetic set is one batch, DSA per image
            order = torch.randperm(len(x), generator=g)
            xb = dsa(x.detach()[order], g)
            net_opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xb), y[order]).backward()
            net_opt.step()
        real = [ctx.real_batch(c, opts.batch_real, g) for c in range(3)]
        plain = x.new_zeros(())
        for c in range(3):
            p = dsa.sample(g)
            lab = torch.full((18,), c)
            gw_real = torch.autograd.grad(torch.nn.functional.cross_entropy(net(dsa.apply(real[c], p)), lab), params)
            out_syn = net(dsa.apply(x[y == c], p))
            gw_syn = torch.autograd.grad(torch.nn.functional.cross_entropy(out_syn, lab[:2]), params, create_graph=True)
            plain = plain + gradient_distance(gw_syn, [t.detach() for t in gw_real])
        (plain_grad,) = torch.autograd.grad(plain, x)
        assert ours[step].item() == pytest.approx(plain.item(), rel=1e-5)
        assert (grads[step] - plain_grad).abs().max() <= 1e-5 * plain_grad.abs().max()
