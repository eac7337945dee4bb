"""The image-file data path: crops on the whole photo, multi-crop, store replay, shards, limits, resume."""
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from distill.config import DataConfig
from distill.data import load_data
from distill.generate_store import generate_labels
from distill.errors import DataError
from distill.imagefiles import RandomCropPlan, TrainViews, collate_views, resolve_eval
from distill.pack import pack_imagefolder
from distill.recipe import parse_config
from distill.runner import train
from distill.webdataset_source import ShardStream, WebDatasetSet, shard_split
from teachers.source import QueryCost, SoftLabels
from teachers.store import StoreSpec, generate_store
from teachers.store_replay import LabelStore, StoredLabeler

RED = (255, 0, 0)


def make_folder(root, per_class=3, classes=("a", "b"), size=(40, 24), val=1):
    """JPEGs of a few sizes, a colour per class and a red marker in the top-left corner."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val)):
        for c, name in enumerate(classes):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                w, h = size[0] + 4 * i, size[1] + 2 * c
                x = rng.integers(60, 120, (h, w, 3), dtype=np.uint8)
                x[..., 2] = 40 + 100 * c
                x[:4, :4] = RED
                Image.fromarray(x).save(root / split / name / f"{i}.jpg", quality=95)
    return root


def test_crops_reach_the_corner_a_centre_square_cuts_off(tmp_path):
    files, _ = load_data(DataConfig(source="imagefolder", path=make_folder(tmp_path, 1, ("a",), (48, 12)),
                                    image_size=8))
    red = lambda v: ((v[..., 0, :, :].int() > 180) & (v[..., 1, :, :].int() < 90)).any().item()  # noqa: E731
    assert not red(files[0][0])  # the centre square of a 48×12 photo never holds x < 4
    views = TrainViews(files, RandomCropPlan(0, 4, (0.05, 0.3), (3 / 4, 4 / 3), 0.0))
    cut = [views[(e, 0)] for e in range(20)]
    assert any(red(v[0]) for v in cut)
    boxes = torch.stack([c[3] for c in cut])
    assert boxes.shape == (20, 4, 4) and boxes[..., 0].min() < 0.1 and boxes[..., 2].max() > 0.9  # whole width
    assert torch.equal(views[(3, 0)][0], cut[3][0]) and not torch.equal(cut[3][0], cut[4][0])  # (seed, epoch, index)


def test_every_recipe_source_is_registered():
    from distill.config import DATA_SOURCES as NAMES
    from distill.data import DATA_SOURCES

    assert DATA_SOURCES.names() == sorted(NAMES)


def test_train_limit_and_subset_for_every_source(tmp_path):
    rng = np.random.default_rng(0)
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=rng.integers(0, 255, (40, 8, 8), dtype=np.uint8), y_train=np.arange(40) % 4,
             x_test=np.zeros((4, 8, 8), np.uint8), y_test=np.arange(4))
    folder = make_folder(tmp_path / "f", per_class=4, classes=("a", "b", "c"))
    pack_imagefolder(folder, tmp_path / "w", shard_bytes=2000, progress=False)
    last = len(list((tmp_path / "w").glob("train-*.tar"))) - 1
    sources = [{"source": "digits"}, {"source": "npz", "path": npz}, {"source": "imagefolder", "path": folder},
               {"source": "webdataset", "urls": str(tmp_path / "w" / f"train-{{000000..{last:06d}}}.tar")}]
    for src in sources:
        limited, _ = load_data(DataConfig(**src, image_size=8, train_limit=5))
        assert len(limited) == 5, src
        per, _ = load_data(DataConfig(**src, image_size=8, train_subset={"per_class": 2, "seed": 1}))
        assert torch.bincount(per.targets).tolist() == [2] * per.num_classes, src
        assert per[0][0].shape == (per.channels, 8, 8)
    folder_limited, _ = load_data(DataConfig(source="imagefolder", path=folder, image_size=8, train_limit=6))
    assert torch.bincount(folder_limited.targets).tolist() == [2, 2, 2]  # classes interleaved, not class 0 only


def test_pack_round_trips_resumes_and_refuses_without_writing(tmp_path):
    folder = make_folder(tmp_path / "f", per_class=5)
    out = tmp_path / "w"
    m = pack_imagefolder(folder, out, shard_bytes=3000, progress=False)
    shards = sorted(out.glob("train-*.tar"))
    assert len(shards) == len(m["splits"]["train"]["shards"]) >= 2
    packed = WebDatasetSet("::".join(map(str, shards)), 8, 3)
    original, _ = load_data(DataConfig(source="imagefolder", path=folder, image_size=8))
    by_bytes = {f.read_bytes(): int(t) for f, t in zip(original.files, original.targets)}
    got = {packed.read(i)[0]: int(packed.targets[i]) for i in range(len(packed))}
    assert got == by_bytes and packed.class_names == original.class_names  # same images, same labels
    (out / "train-000001.tar").unlink()  # a killed pack: the rerun writes what is missing, byte-identical
    assert pack_imagefolder(folder, out, shard_bytes=3000, progress=False) == m
    rec = m["splits"]["train"]["shards"][1]
    assert hashlib.sha256((out / rec["file"]).read_bytes()).hexdigest() == rec["sha256"]
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(DataError, match="differs in shard_bytes"):
        pack_imagefolder(folder, out, shard_bytes=5000, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x").write_text("keep")
    with pytest.raises(DataError, match="not empty"):
        pack_imagefolder(folder, tmp_path / "other", progress=False)
    assert [p.name for p in (tmp_path / "other").iterdir()] == ["x"]


def test_shards_split_over_2_ranks_and_2_workers_cover_every_image_once(tmp_path):
    folder = make_folder(tmp_path / "f", per_class=6)
    pack_imagefolder(folder, tmp_path / "w", shard_bytes=2500, progress=False)
    urls = "::".join(str(p) for p in sorted((tmp_path / "w").glob("train-*.tar")))
    data = WebDatasetSet(urls, 8, 3)
    assert len(data.paths) >= 4
    for epoch in (0, 1):
        parts = [shard_split(len(data.paths), 0, epoch, r, 2, w, 2) for r in range(2) for w in range(2)]
        assert sorted(sum(parts, [])) == list(range(len(data.paths)))
    plan = RandomCropPlan(0, 1, (0.5, 1.0), (3 / 4, 4 / 3), 0.5)
    seen = []
    for rank in range(2):  # real loader workers, one pass each
        stream = ShardStream(data, plan, seed=0, rank=rank, world=2, shuffle_buffer=3, cycle=False)
        for batch in DataLoader(stream, batch_size=2, num_workers=2, collate_fn=collate_views):
            seen += batch[2].tolist()
    assert sorted(seen) == list(range(len(data)))


class Recorder:
    """A label source that remembers the pixels it was shown, per image."""

    num_classes = 2

    def __init__(self):
        self.cost, self.seen = QueryCost(), {}

    def soft_labels(self, images, targets=None, index=None):
        for row, i in enumerate(index.tolist()):
            self.seen.setdefault(i, []).append((images[row] * 255).round().to(torch.uint8))
        return SoftLabels(probs=torch.softmax(images.mean((1, 2, 3))[:, None] * torch.tensor([1.0, -1.0]), 1))


@pytest.mark.parametrize("source", ["imagefolder", "webdataset"])
def test_store_replay_gives_the_pixels_the_teacher_saw(tmp_path, source):
    folder = make_folder(tmp_path / "f", per_class=3, size=(52, 30))
    if source == "imagefolder":
        train, _ = load_data(DataConfig(source="imagefolder", path=folder, image_size=16))
    else:
        pack_imagefolder(folder, tmp_path / "w", shard_bytes=2500, progress=False)
        urls = "::".join(str(p) for p in sorted((tmp_path / "w").glob("train-*.tar")))
        train, _ = load_data(DataConfig(source="webdataset", urls=urls, image_size=16))
    spec = StoreSpec("h", "rec", ("rec",), train.class_names, train.fingerprint(), 16, len(train), epochs=2,
                     crops_per_image=3, topk=2, shard_images=4, seed=5, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                     flip_prob=0.5)
    teacher = Recorder()
    generate_store(tmp_path / "s", spec, train, teacher, torch.device("cpu"), batch_size=6, progress=False, workers=1)
    store = LabelStore(tmp_path / "s")
    assert store.spec.crop_frame == "original"
    labeler = StoredLabeler(store, precut=True)
    for epoch in (0, 1):
        if source == "imagefolder":
            replayed = {i: TrainViews(train, labeler.crop_plan)[(epoch, i)][0] for i in range(len(train))}
        else:
            stream = ShardStream(train, labeler.crop_plan, seed=0, cycle=False)
            stream.set_epoch(epoch)
            replayed = {int(item[2]): item[0] for item in stream}
        for i, views in replayed.items():
            assert torch.equal(views, torch.stack(teacher.seen[i][3 * epoch:3 * epoch + 3])), (epoch, i)
    images = torch.cat([replayed[0], replayed[1]]).float() / 255
    batch = labeler(images, torch.tensor([0] * 3 + [0] * 3), torch.tensor([0] * 3 + [1] * 3), 1)
    assert torch.equal(batch.images, images) and batch.soft.probs.shape == (6, 2)


def test_killed_run_with_workers_resumes_bit_identical(tiny_recipe, tmp_path, monkeypatch):
    from distill.models import load_model
    from students.trainer import Trainer

    folder = make_folder(tmp_path / "f", per_class=4, size=(30, 20), val=1)
    over = dict(data={"source": "imagefolder", "path": str(folder), "image_size": 16, "train_limit": None,
                      "crops_per_image": 2, "augment": {"scale": [0.2, 1.0], "flip": True}},
                student={"model": "test_resnet"}, trainer={"epochs": 2, "batch_size": 4, "num_workers": 2})
    built, build = [], Trainer.build_loader
    monkeypatch.setattr(Trainer, "build_loader", lambda self: built.append(build(self)) or built[-1])
    full = train(parse_config(tiny_recipe("full", **over)))
    assert len(built) == 1 and built[0].persistent_workers and built[0].prefetch_factor == 2  # one loader per run
    original = Trainer.save_checkpoint

    def crash(self, epochs_done):
        original(self, epochs_done)
        raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(Trainer, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        train(parse_config(tiny_recipe("killed", **over)))
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    resumed = train(parse_config(tiny_recipe("killed", **over)))
    a, b = (load_model(r.run_dir / "student.safetensors").state_dict() for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "evaluation: resize short side" in (resumed.run_dir / "report.md").read_text()


def test_eval_protocol_from_the_models_pretrained_cfg():
    ev = resolve_eval(224, models=("resnet50",))
    assert ev.interpolation == "bicubic" and ev.resize == 235 and "resnet50" in ev.origin  # crop_pct 0.95
    assert resolve_eval(224, crop_pct=0.875, models=("resnet50",)).resize == 256
    assert resolve_eval(32, models=("convnet3",)).describe().startswith("resize short side to 32 (bilinear)")
    image = torch.zeros(3, 30, 60, dtype=torch.uint8)
    assert resolve_eval(16, crop_pct=0.5)(image).shape == (3, 16, 16)
    with pytest.raises(DataError, match="eval.resize 10 is below"):
        resolve_eval(16, resize=10)
    assert json.dumps(ev.describe())


def test_data_pack_command(tmp_path, capsys):
    from distill.cli import main

    folder = make_folder(tmp_path / "f", per_class=2)
    assert main(["data", "pack", str(folder), str(tmp_path / "w"), "--shard-size", "3KB"]) == 0
    assert "source: webdataset" in capsys.readouterr().out
    assert main(["data", "pack", str(folder), str(tmp_path / "w"), "--shard-size", "lots"]) == 2
    assert "--shard-size 'lots'" in capsys.readouterr().err
    assert main(["data", "pack", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_eval_on_shards_equals_eval_on_the_folder(tmp_path, capsys):
    """`distill eval --data` takes a pack folder or tar files, and scores the same images, under
    the same evaluation protocol, as the ImageFolder they were packed from."""
    from distill.cli import main
    from distill.models import create_model, save_model

    folder = make_folder(tmp_path / "f", per_class=2, val=3, size=(50, 30))
    pack_imagefolder(folder, tmp_path / "w", shard_bytes=2500, progress=False)
    torch.manual_seed(0)
    save_model(tmp_path / "m.safetensors", create_model("test_resnet", 2, 3, 16, ("a", "b")))
    val_shards = sorted(p.name for p in (tmp_path / "w").glob("val-*.tar"))
    assert len(val_shards) >= 2
    outputs = []
    for data in (folder, tmp_path / "w", "::".join(str(tmp_path / "w" / n) for n in val_shards)):
        assert main(["eval", str(tmp_path / "m.safetensors"), "--data", str(data)]) == 0
        outputs.append(capsys.readouterr().out)
    assert "images 6" in outputs[0] and outputs[0] == outputs[1] == outputs[2]


def test_active_rounds_on_image_files_train_on_crops_of_the_whole_photo(tiny_recipe, tmp_path, monkeypatch):
    """labels.active on an image folder: each round's views are cut from the decoded photo (the red
    corner of a 48×12 photo shows up), not from the centre square its evaluation view is."""
    import distill.active_rounds as ar

    seen = []
    original = ar.ActiveLabeler.__call__

    def spy(self, images, targets, index, epoch, generator):
        batch = original(self, images, targets, index, epoch, generator)
        seen.append((images.clone(), batch.soft.probs.clone(), targets.clone()))
        return batch

    monkeypatch.setattr(ar.ActiveLabeler, "__call__", spy)
    folder = make_folder(tmp_path / "f", per_class=10, size=(48, 12))
    raw = tiny_recipe("act_files", data={"source": "imagefolder", "path": str(folder), "image_size": 8, "train_limit": None,
                                         "augment": {"scale": [0.05, 0.3]}},
                      student={"model": "test_resnet"}, trainer={"epochs": 2, "batch_size": 8},
                      pool={"teachers": [{"model": "test_resnet", "name": "a"}]},
                      labels={"active": {"budget": 0.5, "rounds": 1, "strategy": "margin", "labelled": 4}})
    res = train(parse_config(raw))
    assert res.final["active"]["spent_queries"] == 8  # half of the 16 pool images, one teacher
    red = lambda v: ((v[:, 0].float() > 0.7) & (v[:, 1].float() < 0.35)).flatten(1).any(1)  # noqa: E731
    views = torch.cat([v for v, _, _ in seen])
    assert views.shape[1:] == (3, 8, 8) and red(views).any()
    for _, probs, targets in seen:  # labelled rows one-hot, queried rows the teacher's (soft) label
        labelled = targets >= 0
        assert torch.equal(probs[labelled].argmax(1), targets[labelled]) and torch.all(probs[labelled].max(1).values == 1)
        assert torch.allclose(probs.sum(1), torch.ones(len(probs)))


def test_estimate_of_image_files_times_the_decode_and_matches_generation(tiny_recipe, tmp_path, monkeypatch):
    """Image files: the estimate's sample goes through the generation's own path (decode + cut in
    loader workers), so its bytes per image are the real store's and its time includes decoding."""
    import distill.label_estimate as le

    decoded = []
    real_decode = le.label_file_shard
    monkeypatch.setattr(le, "label_file_shard", lambda *a, **k: decoded.append(a[3:5]) or real_decode(*a, **k))
    folder = make_folder(tmp_path / "f", per_class=12, size=(60, 44))
    raw = tiny_recipe("estf", data={"source": "imagefolder", "path": str(folder), "image_size": 16, "train_limit": None},
                      pool={"teachers": [{"model": "test_resnet", "name": "t"}]},
                      labels={"store": str(tmp_path / "estf"), "generate": {"crops_per_image": 4, "topk": 2,
                                                                           "shard_images": 12}})
    cfg = parse_config(raw)
    est = le.estimate_labels(cfg, sample_images=12)
    assert decoded == [(0, 12)] * 4  # warm-up + 3 timed passes, each decoding the sample
    assert not (tmp_path / "estf").exists()
    real = generate_labels(cfg, progress=False)
    assert 0.9 <= est.bytes / real.manifest["bytes"] <= 1.1
    assert 0.5 <= est.seconds_per_crop / (real.seconds / est.crops) <= 2.0
