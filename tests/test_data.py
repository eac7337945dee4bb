import numpy as np
import pytest
import torch
from PIL import Image

from distill.cli import main
from distill.config import DataConfig
from distill.data import DataError, load_data, load_split
from distill.models import create_model, save_model


def test_digits_built_in_upscaled():
    train, test = load_data(DataConfig(image_size=24))
    assert train.images.shape[1:] == (1, 24, 24) and train.images.dtype == torch.uint8
    assert len(train) + len(test) == 1797 and train.class_names == tuple("0123456789")
    assert set(test.targets.tolist()) == set(range(10))


def test_npz_formats_and_class_names(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=rng.random((12, 10, 10, 3)).astype(np.float32), y_train=np.arange(12) % 4,
             x_test=rng.integers(0, 256, (4, 10, 10, 3), dtype=np.uint8), y_test=np.arange(4),
             class_names=np.array(["a", "b", "c", "d"]))
    train, test = load_data(DataConfig(source="npz", path=p, image_size=10))
    assert train.images.shape == (12, 3, 10, 10) and train.class_names == ("a", "b", "c", "d")
    assert torch.equal(test.images, torch.from_numpy(np.load(p)["x_test"]).permute(0, 3, 1, 2))
    gray, _ = load_data(DataConfig(source="npz", path=p, image_size=10, channels=1))
    assert gray.channels == 1


def test_npz_errors_name_the_problem(tmp_path):
    p = tmp_path / "bad.npz"
    np.savez(p, x_train=np.zeros((3, 8, 8), np.uint8), y_train=np.zeros(2, int))
    with pytest.raises(DataError, match="missing arrays"):
        load_data(DataConfig(source="npz", path=p))
    np.savez(p, x_train=np.zeros((3, 8, 8), np.uint8), y_train=np.zeros(2, int),
             x_test=np.zeros((1, 8, 8), np.uint8), y_test=np.zeros(1, int))
    with pytest.raises(DataError, match="3 images but y_train has 2"):
        load_data(DataConfig(source="npz", path=p))
    p.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable"):
        load_data(DataConfig(source="npz", path=p))


def test_imagefolder(tmp_path):
    for split, n in (("train", 3), ("val", 1)):
        for c, color in (("cat", 50), ("dog", 200)):
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((20, 30, 3), color, np.uint8)).save(d / f"{i}.png")
    train, test = load_data(DataConfig(source="imagefolder", path=tmp_path, image_size=16))
    assert train.class_names == ("cat", "dog") and len(train) == 6 and len(test) == 2
    img, target, idx = train[4]
    assert img.shape == (3, 16, 16) and target == 1 and int(img.float().mean()) == 200
    assert train.fingerprint() != test.fingerprint()
    (tmp_path / "val" / "cow").mkdir()
    with pytest.raises(DataError, match="differ from the training classes"):
        load_data(DataConfig(source="imagefolder", path=tmp_path, image_size=16))


def test_eval_reads_only_the_split_it_scores(tmp_path, capsys):
    """`distill eval --split test` never decodes x_train (here unreadable), and uses loader workers."""

    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.zeros((5, 2, 2, 2, 2), np.uint8), y_train=np.array([0, 1, 2, 0, 1]),
             x_test=rng.integers(0, 255, (12, 16, 16), dtype=np.uint8), y_test=np.arange(12) % 3)
    cfg = DataConfig(source="npz", path=path, image_size=16)
    with pytest.raises(DataError, match="x_train has shape"):
        load_data(cfg)
    test = load_split(cfg, "test")
    assert len(test) == 12 and test.class_names == ("0", "1", "2")
    save_model(tmp_path / "m.safetensors", create_model("test_vit", 3, 1, 16, ("0", "1", "2")))
    assert main(["eval", str(tmp_path / "m.safetensors"), "--data", str(path), "--workers", "2"]) == 0
    assert "images 12" in capsys.readouterr().out
