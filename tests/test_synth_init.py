"""`init.kind: confident_crops` (RDED's patch selection + stitching, HeLlO's starting images) on
constructed data and a constructed teacher whose confidence is known."""
from __future__ import annotations

import pytest
import torch

from distill.config import ConfigError
from distill.data import ImageSet
from distill.models import create_model, save_model
from distill.recipe import parse_synth_config
from synth.artefact import quantise, read_artefact
from synth.config import InitConfig
from synth.init import check_init, class_indices, init_images, select_crops, stitch
from synth.run import SynthJob, synthesize

S = 16


class BrightTeacher:
    """Class 0's logit grows with the brightness of the image: the brighter a patch, the lower its
    −log p(class 0)."""

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(x), 2)
        out[:, 0] = 5 * x.mean(dim=(1, 2, 3))  # small enough that p stays below 1 in float32
        return out


def square_set(n: int = 24) -> ImageSet:
    """Class 0: black images, every other one with a white 8×8 square at rows/columns 4..11."""
    images = torch.zeros(2 * n, 1, S, S, dtype=torch.uint8)
    images[0:n:2, :, 4:12, 4:12] = 255
    return ImageSet(images, torch.arange(2).repeat_interleave(n), ("a", "b"))


def crops(**kw) -> InitConfig:
    return InitConfig(kind="confident_crops", **kw)


def run(init: InitConfig, real: ImageSet, ipc: int = 2, seed: int = 0, lo: int = 0, hi: int | None = None):
    return init_images(init, real, class_indices(real), [0], lo, ipc if hi is None else hi, ipc, seed,
                       [BrightTeacher()], torch.device("cpu"), torch.full((1, 1, 1, 1), 0.1), torch.ones(1, 1, 1, 1))


def test_picks_the_crop_the_teacher_is_most_confident_on():
    real = square_set()
    # crops of 3-4 px, upsampled to 16: all white only if the crop lies inside the square, ≥ 1 px from
    # its edge (bilinear taps), which about one crop in 12 of a square image does
    init = crops(crops_per_image=20, scale=(0.03, 0.06))
    patches = select_crops(init, real, class_indices(real)[0], 0, 3, 0, [BrightTeacher()], torch.device("cpu"),
                           torch.zeros(1, 1, 1, 1))
    assert patches.shape == (3, 1, S, S)
    assert (patches == 1).all()


def test_each_image_gives_one_patch_and_the_best_images_win():
    """Stitched 2×2 at IPC 3: 12 patches from 12 distinct images; the 12 square images win over
    the 12 black ones (each image's best crop, then the best across images)."""
    real = square_set()
    x = run(crops(crops_per_image=8, scale=(0.1, 0.2), stitch=2), real, ipc=3)
    assert x.shape == (3, 1, S, S)
    cells = x.unfold(2, S // 2, S // 2).unfold(3, S // 2, S // 2).reshape(3, 4, -1)
    assert (cells.mean(-1) > 0.5).all()  # no cell came from a black image


def test_stitch_places_patch_k_ipc_plus_i_in_cell_k_of_image_i():
    ipc, f, size = 3, 2, 9  # 9 = 5 + 4: the first row/column of cells is one pixel larger (RDED)
    patches = torch.arange(ipc * f * f, dtype=torch.float).view(-1, 1, 1, 1).expand(-1, 1, 4, 4)
    out = stitch(patches, ipc, f, size)
    assert out.shape == (ipc, 1, size, size)
    for i in range(ipc):
        for k, (rows, cols) in enumerate([(slice(0, 5), slice(0, 5)), (slice(0, 5), slice(5, 9)),
                                          (slice(5, 9), slice(0, 5)), (slice(5, 9), slice(5, 9))]):
            assert (out[i, 0, rows, cols] == k * ipc + i).all()


def test_stitched_images_hold_the_selected_patches():
    real = square_set()
    init = crops(crops_per_image=4, stitch=2)
    patches = select_crops(init, real, class_indices(real)[0], 0, 2, 0, [BrightTeacher()], torch.device("cpu"),
                           torch.full((1, 1, 1, 1), 0.1))
    x = run(init, real, ipc=2)
    h = S // 2
    for i in range(2):
        for k, (r, q) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
            assert torch.equal(x[i, :, r * h:(r + 1) * h, q * h:(q + 1) * h], patches[k * 2 + i])


def test_deterministic_per_seed_and_chunk_independent():
    real = square_set()
    init = crops(crops_per_image=3, stitch=2)
    a = run(init, real, ipc=4, seed=1)
    assert torch.equal(a, run(init, real, ipc=4, seed=1))
    assert torch.equal(a[1:3], run(init, real, ipc=4, seed=1, lo=1, hi=3))  # a chunk of IPC slots 1..2
    assert not torch.equal(a, run(init, real, ipc=4, seed=2))


def _recipe(**init):
    return {"name": "x", "data": {"source": "digits", "image_size": 8}, "ipc": 2, "method": "none",
            "teachers": [{"model": "test_resnet", "checkpoint": __file__}], "init": init}


@pytest.mark.parametrize("init, field", [
    ({"kind": "confident_crops", "stitch": 0}, "init.stitch"),
    ({"kind": "confident_crops", "crops_per_image": 0}, "init.crops_per_image"),
    ({"kind": "confident_crops", "candidates": 0}, "init.candidates"),
    ({"kind": "confident_crops", "scale": [0.5, 0.1]}, "init.scale"),
    ({"kind": "real", "stitch": 2}, "stitch: not an option of kind 'real'"),
    ({"kind": "real_confident", "crops_per_image": 2}, "crops_per_image: not an option of kind 'real_confident'"),
])
def test_bad_options_refused_at_load(init, field):
    with pytest.raises(ConfigError, match=field):
        parse_synth_config(_recipe(**init))


def test_a_dumped_recipe_reads_back():
    """config.yaml / recipe.yaml list every field; the other kinds' options sit at their defaults."""
    for init in ({"kind": "real"}, {"kind": "confident_crops", "stitch": 2}):
        cfg = parse_synth_config(_recipe(**init))
        assert parse_synth_config(cfg.to_dict()).init == cfg.init


def test_method_none_refuses_flip():
    """FYI's flip acts on images being optimised; method none optimises nothing, so it is refused."""
    with pytest.raises(ConfigError, match="flip: flip: true mirrors the images while they are optimised"):
        parse_synth_config({**_recipe(kind="real"), "flip": True})


def test_confident_crops_needs_teachers():
    raw = {**_recipe(kind="confident_crops"), "teachers": []}
    with pytest.raises(ConfigError, match="init.kind confident_crops need trained teachers"):
        parse_synth_config(raw)


@pytest.mark.parametrize("init, ipc, message", [
    (crops(candidates=7, stitch=2), 2, r"init.candidates: 7 < ipc·stitch² = 2·2² = 8"),
    (crops(stitch=5), 1, r"init.stitch: 5 cells per side of 4-pixel images"),
    (crops(stitch=2), 7, r"ipc·stitch² = 7·2² = 28 but init.kind 'confident_crops' needs that many real images"),
])
def test_bad_options_refused_before_compute(init, ipc, message):
    real = ImageSet(torch.zeros(40, 1, 4, 4, dtype=torch.uint8), torch.arange(2).repeat_interleave(20), ("a", "b"))
    with pytest.raises(ConfigError, match=message):
        check_init(init, ipc, real, class_indices(real))


def test_method_none_keeps_the_selected_patches(tmp_path):
    """HeLlO's image pipeline: the distilled images are the stitched confident crops themselves."""
    torch.manual_seed(0)
    teacher = tmp_path / "teacher.safetensors"
    save_model(teacher, create_model("test_resnet", 10, 1, 8, tuple(str(i) for i in range(10))))
    cfg = parse_synth_config({
        "name": "crops", "out_dir": str(tmp_path / "synth"), "seed": 0, "precision": "bf16",
        "data": {"source": "digits", "image_size": 8, "train_limit": 200}, "ipc": 2, "method": "none",
        "init": {"kind": "confident_crops", "crops_per_image": 2, "stitch": 2},
        "teachers": [{"model": "test_resnet", "checkpoint": str(teacher)}], "chunk": {"classes": 5, "ipc": 1}})
    m = synthesize(cfg, progress=False).manifest
    assert m["method"] == "none" and m["init"] == "confident_crops" and m["num_images"] == 20
    job = SynthJob(cfg, 0, 1, None, progress=False)  # the same data, statistics and bf16 teacher
    x0 = init_images(cfg.init, job.real, job.by_class, list(range(10)), 0, 2, 2, 0, job.teachers, job.device,
                     job.mean, job.std)
    assert torch.equal(read_artefact(cfg.run_dir).images.images, quantise(x0, "uint8"))
