"""FKD/FerKD label store: replay is exact (crops, SelfMix, labels), top-k decoding, FerKD marks the
right crops, damaged or mismatched stores are refused by name, a killed generation resumes to an
identical store, rank sharding merges to the same store, and `distill labels` → `distill train`
runs without building a teacher."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.artefacts import ArtefactError
from distill.cli import main as cli_main
from distill.data import ImageSet
from distill.errors import ConfigError
from distill.recipe import parse_config
from teachers.calibrate import RegionCalibrator, softened_hard_label
from teachers.regions import compress_topk, decompress
from teachers.source import QueryCost, SoftLabels
from teachers.store import StoreSpec, StoreWriter, generate_store, splice_partners
from teachers.store_replay import LabelStore, StoredLabeler

C, S = 6, 16


def tiny_set(n: int = 10, seed: int = 0, names: tuple[str, ...] | None = None) -> ImageSet:
    """Smooth images (a ramp plus noise), so crop means differ from crop to crop."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 160, S)[None, None, None, :].expand(n, 1, S, S)
    x = (ramp + 90 * torch.rand(n, 1, S, S, generator=g)).round().clamp(0, 255).to(torch.uint8)
    return ImageSet(x, torch.arange(n) % C, names or tuple(f"c{i}" for i in range(C)))


class PixelSource:
    """A deterministic label source that records what it was shown: the GT class gets a
    probability that grows with the crop's mean brightness (a known, rankable score)."""

    def __init__(self):
        self.num_classes, self.cost = C, QueryCost()
        self.crops: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []

    def soft_labels(self, images, targets=None, index=None) -> SoftLabels:
        self.cost.add("pixel", len(images), 0.0)
        gt = 0.1 + 0.8 * images.mean(dim=(1, 2, 3))
        other = torch.stack([images[:, 0, :, : S // 2 + c].mean(dim=(1, 2)) + 0.01 * c for c in range(C)], 1)
        rest = torch.softmax(4 * other, 1)
        rest = rest.scatter(1, targets[:, None], 0.0)
        probs = rest / rest.sum(1, keepdim=True) * (1 - gt)[:, None]
        probs = probs.scatter(1, targets[:, None], gt[:, None])
        self.crops.append(images.clone())
        self.probs.append(probs.clone())
        return SoftLabels(probs=probs)


def make_spec(train: ImageSet, **over) -> StoreSpec:
    kw = dict(config_hash="test", label_source="pixel", teachers=("pixel",), class_names=train.class_names,
              data_fingerprint=train.fingerprint(), image_size=S, num_images=len(train), epochs=2,
              crops_per_image=4, topk=3, shard_images=4, seed=0, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3),
              flip_prob=0.5)
    kw.update(over)
    return StoreSpec(**kw)


def write(root: Path, spec: StoreSpec, train: ImageSet, source=None, calibrator=None, **kw):
    source = source or PixelSource()
    manifest = generate_store(root, spec, train, source, torch.device("cpu"), batch_size=8, progress=False,
                              calibrator=calibrator, **kw)
    return manifest, source


def loaded(train: ImageSet, index: torch.Tensor) -> torch.Tensor:
    return train.images[index].float().div_(255)  # what the trainer hands the labeler


def recorded_by_image(spec: StoreSpec, source: PixelSource, epoch: int):
    """The source's crops/probs of one epoch, `[N, M, ...]` (generation order: chunk, epoch, image)."""
    crops, probs = torch.cat(source.crops), torch.cat(source.probs)
    M = spec.crops_per_image
    per = [(e, c) for c in range(spec.num_chunks) for e in range(spec.epochs)]
    out_c, out_p, row = [], [], 0
    for e, c in per:
        lo, hi = spec.chunk_range(c)
        k = (hi - lo) * M
        if e == epoch:
            out_c.append(crops[row:row + k])
            out_p.append(probs[row:row + k])
        row += k
    return torch.cat(out_c).reshape(spec.num_images, M, 1, S, S), torch.cat(out_p).reshape(spec.num_images, M, C)


# ------------------------------------------------------------------------------- replay


def test_replay_is_exact_crops_and_labels(tmp_path):
    train = tiny_set(10)
    spec = make_spec(train)
    manifest, source = write(tmp_path / "s", spec, train)
    assert manifest["bytes"] == sum(r["bytes"] for r in manifest["shards"]) > 0
    labeler = StoredLabeler(LabelStore(tmp_path / "s"))  # all M = 4 views per image
    for epoch in (0, 1):
        crops, probs = recorded_by_image(spec, source, epoch)
        index = torch.tensor([7, 2, 9, 0, 5])
        batch = labeler(loaded(train, index), train.targets[index], index, epoch)
        assert batch.images.shape == (5 * 4, 1, S, S)
        assert torch.equal(batch.images, crops[index].flatten(0, 1))  # the very pixels the teacher saw
        assert torch.equal(batch.targets, train.targets[index].repeat_interleave(4))
        want = decompress(*compress_topk(probs[index].flatten(0, 1), 3), C, "marginal_smoothing")
        assert torch.equal(batch.soft.probs, want)
        assert batch.soft.mask is None
    # epochs differ; fewer views take the first stored crops of each image
    two = StoredLabeler(LabelStore(tmp_path / "s"), crops_per_image=2)
    b2 = two(loaded(train, index), train.targets[index], index, 1)
    assert torch.equal(b2.images, crops[index, :2].flatten(0, 1))
    assert not torch.equal(recorded_by_image(spec, source, 0)[0], crops)


def test_topk_renormalisation_and_dense_store(tmp_path):
    train = tiny_set(6)
    _, source = write(tmp_path / "k2", make_spec(train, topk=2, epochs=1), train)
    probs = recorded_by_image(make_spec(train, topk=2, epochs=1), source, 0)[1].flatten(0, 1)
    index = torch.arange(6)
    b = StoredLabeler(LabelStore(tmp_path / "k2"), decode="marginal_renorm")(loaded(train, index), train.targets, index, 0)
    q = b.soft.probs
    torch.testing.assert_close(q.sum(1), torch.ones(len(q)))
    top = probs.topk(2, dim=1)
    assert torch.equal((q > 0).sum(1), torch.full((len(q),), 2))
    assert torch.equal(q.topk(2, dim=1).indices, top.indices)
    ratio = top.values[:, 0] / top.values[:, 1]
    torch.testing.assert_close(q.gather(1, top.indices)[:, 0] / q.gather(1, top.indices)[:, 1], ratio, rtol=2e-3, atol=0)
    # full: every class kept, dense fp16, no class ids stored
    _, src_full = write(tmp_path / "full", make_spec(train, topk=C, epochs=1), train)
    full = LabelStore(tmp_path / "full")
    assert "indices" not in full.load_epoch(0)
    b = StoredLabeler(full)(loaded(train, index), train.targets, index, 0)
    p_full = recorded_by_image(make_spec(train, topk=C, epochs=1), src_full, 0)[1].flatten(0, 1)
    torch.testing.assert_close(b.soft.probs, p_full.half().float(), atol=0, rtol=0)


def test_selfmix_replay_mixes_within_the_image_and_labels_consistently(tmp_path):
    train = tiny_set(8)
    for mode in ("cutmix", "mixup"):
        spec = make_spec(train, epochs=1, selfmix_mode=mode, topk=C)
        _, source = write(tmp_path / mode, spec, train)
        store = LabelStore(tmp_path / mode)
        rows = store.load_epoch(0)
        partner = rows["mix_partner"].long()
        assert (partner != torch.arange(4)).all()  # a cycle: no crop mixes with itself
        crops, probs = recorded_by_image(spec, source, 0)
        index = torch.tensor([3, 1, 6])
        b = StoredLabeler(store)(loaded(train, index), train.targets[index], index, 0)
        own, other = crops[index].flatten(0, 1), crops[index[:, None], partner[index]].flatten(0, 1)
        y_own = probs[index].flatten(0, 1).half().float()
        y_other = probs[index[:, None], partner[index]].flatten(0, 1).half().float()
        if mode == "cutmix":
            region = (rows["mix_boxes"][index].flatten(0, 1).float() * S).round()
            xs = torch.arange(S)
            inside = (((xs[None, :] >= region[:, 0:1]) & (xs[None, :] < region[:, 2:3]))[:, None, :]
                      & ((xs[None, :] >= region[:, 1:2]) & (xs[None, :] < region[:, 3:4]))[:, :, None])
            want = torch.where(inside[:, None], other, own)
            lam = 1 - inside.flatten(1).float().mean(1)
        else:
            lam = rows["mix_lam"][index].flatten(0, 1).float()
            want = lam[:, None, None, None] * own + (1 - lam[:, None, None, None]) * other
        torch.testing.assert_close(b.images, want, atol=1e-6, rtol=0)
        torch.testing.assert_close(b.soft.probs, lam[:, None] * y_own + (1 - lam[:, None]) * y_other)


def test_splice_partners_skips_discarded_crops():
    partner = torch.tensor([[1, 2, 3, 0]])
    keep = torch.tensor([[True, False, True, True]])
    assert splice_partners(partner, keep).tolist() == [[2, 1, 3, 0]]
    assert splice_partners(partner, torch.tensor([[True, False, False, False]])).tolist() == [[0, 1, 2, 3]]


# ------------------------------------------------------------------------------ FerKD


def test_calibration_marks_the_right_crops(tmp_path):
    """20 crops per image, default thresholds: per image the dimmest crop (lowest GT probability) is
    discarded, the next three get the softened hard label, the brightest is discarded, the other 15
    keep the teacher's label; kept crops are stored first."""
    train = tiny_set(6)
    M = 20
    spec = make_spec(train, epochs=1, crops_per_image=M, topk=C, calibration={"t_low": 0.05})
    source = PixelSource()
    cal = RegionCalibrator(source, 0.05, 0.2, 0.95, 0.1, "gt_prob", "per_image", crops_per_image=M)
    manifest, _ = write(tmp_path / "f", spec, train, source=cal, calibrator=cal)
    fr = manifest["band_fractions"]
    assert fr == pytest.approx({"discard_hard": 1 / 20, "calibrate": 3 / 20, "keep": 15 / 20, "discard_easy": 1 / 20})
    rows = LabelStore(tmp_path / "f").load_epoch(0)
    assert rows["keep"][:, :18].all() and not rows["keep"][:, 18:].any()  # kept first
    index = torch.arange(6)
    b = StoredLabeler(LabelStore(tmp_path / "f"))(loaded(train, index), train.targets, index, 0)
    views, targets = b.images.reshape(6, M, 1, S, S), train.targets
    truth = source.__class__().soft_labels(b.images, targets.repeat_interleave(M)).probs.reshape(6, M, C)
    score = truth.gather(2, targets[:, None, None].expand(6, M, 1))[..., 0]
    rank = score.argsort(1).argsort(1)  # 0 = dimmest
    mask, probs = b.soft.mask.reshape(6, M), b.soft.probs.reshape(6, M, C)
    assert torch.equal(mask, (rank > 0) & (rank < M - 1))
    smooth = softened_hard_label(targets, C, 0.1)[:, None].expand(6, M, C).half().float()
    calibrated = (rank >= 1) & (rank <= 3)
    assert torch.equal(probs[calibrated], smooth[calibrated])
    kept = (rank >= 4) & (rank < M - 1)
    torch.testing.assert_close(probs[kept], truth[kept].half().float(), atol=1e-6, rtol=0)
    assert views.shape[1] == M


# -------------------------------------------------------------------------- refusals


@pytest.fixture
def store(tmp_path):
    train = tiny_set(10)
    write(tmp_path / "s", make_spec(train), train)
    return tmp_path / "s", train


def test_damaged_shards_are_refused_by_name(store):
    root, train = store
    shard = root / "shards" / "e0001-c00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    st = LabelStore(root)
    st.load_epoch(0)  # other epochs are fine
    with pytest.raises(ArtefactError, match=r"e0001-c00002.safetensors is corrupted"):
        st.load_epoch(1)
    shard.write_bytes(bytes(data[:-40]))
    with pytest.raises(ArtefactError, match=r"e0001-c00002.safetensors is truncated"):
        st.load_epoch(1)
    shard.unlink()
    with pytest.raises(ArtefactError, match=r"e0001-c00002.safetensors is missing"):
        st.load_epoch(1)


def test_a_deleted_shard_is_regenerated_identically(store):
    root, train = store
    shard = root / "shards" / "e0001-c00002.safetensors"
    before, manifest = shard.read_bytes(), json.loads((root / "manifest.json").read_text())
    shard.unlink()
    with pytest.raises(ArtefactError, match="e0001-c00002.safetensors is missing; delete it and rerun"):
        LabelStore(root).check_files()
    source = PixelSource()
    again, _ = write(root, make_spec(train), train, source=source)
    assert source.cost.total_queries == 2 * 4  # only that shard's 2 images × 4 crops
    assert shard.read_bytes() == before and again == manifest


def test_damaged_or_unfinished_manifest_is_refused(store):
    root, _ = store
    m = json.loads((root / "manifest.json").read_text())
    m["shards"] = [r for r in m["shards"] if r["file"] != "e0000-c00001.safetensors"]
    (root / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtefactError, match="e0000-c00001.safetensors .* missing from the manifest"):
        LabelStore(root)
    (root / "manifest.json").write_text("{ not json")
    with pytest.raises(ArtefactError, match="not readable JSON"):
        LabelStore(root)
    (root / "manifest.json").unlink()
    with pytest.raises(ArtefactError, match="has not finished"):
        LabelStore(root)


def test_store_for_other_data_is_refused(store):
    root, train = store
    st = LabelStore(root)
    st.check_data(train)
    with pytest.raises(ArtefactError, match="made from another dataset"):
        st.check_data(tiny_set(10, seed=1))
    with pytest.raises(ArtefactError, match="made for classes"):
        st.check_data(tiny_set(10, names=tuple(f"d{i}" for i in range(C))))
    with pytest.raises(ArtefactError, match="made for 10 training images"):
        st.check_data(tiny_set(9))
    with pytest.raises(ValueError, match="crops_per_image: 5 .* holds 4"):
        StoredLabeler(st, crops_per_image=5)


def test_writing_into_another_store_is_refused(store):
    root, train = store
    with pytest.raises(ArtefactError, match="another recipe or data .*topk"):
        StoreWriter(root, make_spec(train, topk=2))


# ------------------------------------------------------------------ resume and sharding


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((root / "shards").iterdir())}


def test_killed_generation_resumes_to_an_identical_store(tmp_path, monkeypatch):
    train = tiny_set(10)
    spec = make_spec(train, selfmix_mode="cutmix")
    full, _ = write(tmp_path / "full", spec, train)

    original, calls = StoreWriter.write, {"n": 0}

    def killed_after_two(self, *a, **k):
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")
        calls["n"] += 1
        return original(self, *a, **k)

    monkeypatch.setattr(StoreWriter, "write", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        write(tmp_path / "killed", spec, train)
    monkeypatch.setattr(StoreWriter, "write", original)
    assert len(list((tmp_path / "killed" / "shards").iterdir())) == 2
    with pytest.raises(ArtefactError, match="has not finished"):
        LabelStore(tmp_path / "killed")
    source = PixelSource()
    resumed, _ = write(tmp_path / "killed", spec, train, source=source)
    assert source.cost.total_queries == (10 - 4) * 2 * 4  # chunk 0's two epochs were not redone
    assert resumed == full
    assert _files(tmp_path / "killed") == _files(tmp_path / "full")


def test_ranks_write_their_own_shards_and_merge(tmp_path):
    train = tiny_set(10)
    spec = make_spec(train)
    single, _ = write(tmp_path / "one", spec, train)
    assert write(tmp_path / "two", spec, train, rank=1, world=2)[0] is None  # rank 0 still missing
    names = {p.name for p in (tmp_path / "two" / "shards").iterdir()}
    assert names == {spec.shard_name(e, 1) for e in range(2)}  # chunks c with c % 2 == 1
    merged, _ = write(tmp_path / "two", spec, train, rank=0, world=2)
    assert merged == single
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


# --------------------------------------------------------------------- recipe → CLI → train


def test_cli_labels_then_train_builds_no_teacher(tiny_recipe, tmp_path, monkeypatch, capsys):
    import yaml

    import distill.runner as runner

    raw = tiny_recipe("ferkd", pool={"teachers": [{"model": "test_vit", "name": "t"}]}, trainer={"epochs": 1},
                      labels={"store": str(tmp_path / "store"), "crops_per_image": 2,
                              "generate": {"crops_per_image": 12, "topk": 3, "shard_images": 64,
                                           "calibrate": {}, "selfmix": {"mode": "cutmix"}}})
    recipe = tmp_path / "ferkd.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert cli_main(["labels", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "1 epochs × 96 images × 12 crops" in out and "FerKD bands" in out and "B/crop" in out

    def no_teacher(*a, **k):
        raise AssertionError("a teacher was built for a store run")

    monkeypatch.setattr(runner, "build_pool", no_teacher)
    result = runner.train(parse_config(raw))
    assert result.final["teacher_queries"] == 0 and "train_kd" in result.history[-1]
    assert "label store" in (result.run_dir / "report.md").read_text()

    # a store of E label epochs serves more student epochs: epoch e replays label epoch e mod E, exactly
    longer = runner.train(parse_config({**raw, "name": "ferkd3", "trainer": {**raw["trainer"], "epochs": 3}}))
    assert len(longer.history) == 3 and "replays label epoch e mod 1" in (longer.run_dir / "report.md").read_text()
    from teachers.store_replay import LabelStore
    from teachers.store_labels import CyclicStoredLabeler

    cyclic = CyclicStoredLabeler(LabelStore(tmp_path / "store"), 2)
    first = {k: v.clone() for k, v in cyclic.rows(0).items()}
    assert all(torch.equal(cyclic.rows(e)[k], first[k]) for e in (1, 2) for k in first)
    # the recipe must fit the store: other k, other data are refused before training
    other = json.loads(json.dumps(raw))
    other["labels"]["generate"]["topk"] = 5
    with pytest.raises(ArtefactError, match="generated from another recipe"):
        runner.train(parse_config(other))
    other = json.loads(json.dumps(raw))
    other["data"]["train_limit"] = 80
    other["labels"].pop("generate")
    with pytest.raises(ArtefactError, match="made for 96 training images"):
        runner.train(parse_config(other))
    assert cli_main(["train", str(recipe), "labels.generate.topk=5"]) == 2
    shard = next((tmp_path / "store" / "shards").iterdir())
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ArtefactError, match="is truncated"):
        runner.train(parse_config({**raw, "name": "after_truncation"}))
    assert not (tmp_path / "runs" / "after_truncation").exists()  # refused before any step


def test_config_rejects_bad_label_sections(tiny_recipe):
    with pytest.raises(ConfigError, match="labels.generate.selfmix.*crops_per_image >= 2|crops_per_image >= 2"):
        parse_config(tiny_recipe(labels={"store": "x", "generate": {"crops_per_image": 1, "selfmix": {}}}))
    with pytest.raises(ConfigError, match="t_low <= t_mid <= t_top"):
        parse_config(tiny_recipe(labels={"store": "x", "generate": {"calibrate": {"t_low": 0.5, "t_mid": 0.2}}}))
    with pytest.raises(ConfigError, match="holds probabilities only"):
        parse_config(tiny_recipe(pool={"teachers": [{"model": "test_vit"}]}, labels={"store": "x"},
                                 loss={"discriminator": "joint"}))
    with pytest.raises(ConfigError, match="topk"):
        parse_config(tiny_recipe(labels={"store": "x", "generate": {"topk": 0}}))


def test_estimate_agrees_with_a_real_generation(tiny_recipe, tmp_path):
    """`distill labels --estimate` writes nothing, and its bytes and time per crop agree with a real
    generation of the same store within 2×."""
    from distill.generate_store import generate_labels
    from distill.label_estimate import estimate_labels

    raw = tiny_recipe("est", pool={"teachers": [{"model": "test_resnet", "name": "t"}]}, trainer={"epochs": 2},
                      labels={"store": str(tmp_path / "est"), "generate": {"crops_per_image": 8, "topk": 3,
                                                                          "shard_images": 32}})
    cfg = parse_config(raw)
    est = estimate_labels(cfg, sample_images=32)
    assert not (tmp_path / "est").exists()
    assert est.crops == 96 * 2 * 8 and est.shards == 3 * 2
    real = generate_labels(cfg, progress=False)
    assert 0.5 <= est.bytes / real.manifest["bytes"] <= 2.0
    real_per_crop = real.seconds / est.crops
    assert 0.5 <= est.seconds_per_crop / real_per_crop <= 2.0, (est.seconds_per_crop, real_per_crop)
    assert "crops" in est.summary() and "teacher-hours" in est.summary()
