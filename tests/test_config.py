import pytest

from distill.config import ConfigError, apply_overrides
from distill.recipe import load_config, parse_config
from distill.runner import train


def err(raw) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(raw, "r.yaml")
    return str(e.value)


def test_valid_recipe_round_trips(tiny_recipe):
    cfg = parse_config(tiny_recipe())
    assert cfg.student.model == "test_vit" and cfg.trainer.epochs == 2
    assert cfg.hash() == parse_config(tiny_recipe()).hash()


def test_unknown_key_names_the_field(tiny_recipe):
    msg = err(tiny_recipe(trainer={"epochz": 3}))
    assert "trainer.epochz: unknown key" in msg


def test_wrong_type_names_field_and_value(tiny_recipe):
    msg = err(tiny_recipe(trainer={"epochs": "many"}))
    assert "trainer.epochs" in msg and "'many'" in msg


def test_unknown_model_suggests(tiny_recipe):
    msg = err(tiny_recipe(student={"model": "resnet18x"}))
    assert "student.model" in msg and "unknown model 'resnet18x'" in msg and "resnet18" in msg


def test_missing_checkpoint_and_data_files(tiny_recipe, tmp_path):
    msg = err(tiny_recipe(student={"model": "test_vit", "checkpoint": str(tmp_path / "nope.safetensors")}))
    assert "student.checkpoint" in msg and "does not exist" in msg
    msg = err(tiny_recipe(data={"source": "npz", "path": str(tmp_path / "x.npz")}))
    assert "data" in msg and "does not exist" in msg


def test_literal_lists_allowed_values(tiny_recipe):
    msg = err(tiny_recipe(loss={"kd": "mse"}))
    assert "loss.kd" in msg and "'soft_ce'" in msg and "'kl'" in msg


def test_several_problems_reported_at_once(tiny_recipe):
    msg = err(tiny_recipe(trainer={"epochs": 0, "batch_size": -1}))
    assert "2 problems" in msg


def test_discriminator_without_pool_refused(tiny_recipe):
    assert "needs a teacher pool" in err(tiny_recipe(loss={"discriminator": "joint"}))


def test_overrides_nested_and_indexed(tiny_recipe):
    raw = tiny_recipe(pool={"teachers": [{"model": "test_vit"}, {"model": "test_resnet"}]})
    out = apply_overrides(raw, ["trainer.epochs=7", "pool.teachers.1.name=r", "optim.name=adamw"])
    assert out["trainer"]["epochs"] == 7 and out["pool"]["teachers"][1]["name"] == "r"
    assert raw["trainer"]["epochs"] == 2  # the input is not mutated
    with pytest.raises(ConfigError, match="not an index"):
        apply_overrides(raw, ["pool.teachers.5.name=x"])
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides(raw, ["trainer.epochs"])


def test_load_config_from_yaml(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nstudent: {model: test_vit}\n")
    assert load_config(p, ["seed=3"]).seed == 3
    p.write_text("- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_class_count_mismatch_refused_before_training(tiny_recipe, tmp_path):
    import numpy as np

    teacher = train(parse_config(tiny_recipe("t", trainer={"epochs": 1})))
    npz = tmp_path / "three.npz"
    rng = np.random.default_rng(0)
    np.savez(npz, x_train=rng.integers(0, 255, (30, 8, 8), dtype=np.uint8), y_train=np.arange(30) % 3,
             x_test=rng.integers(0, 255, (9, 8, 8), dtype=np.uint8), y_test=np.arange(9) % 3)
    raw = tiny_recipe("s", data={"source": "npz", "path": str(npz), "image_size": 16, "train_limit": None},
                      pool={"teachers": [{"model": "test_vit", "checkpoint": str(teacher.run_dir / "student.safetensors")}]})
    with pytest.raises(ConfigError, match=r"pool.teachers.0.checkpoint: .* 10 classes; the data has 3"):
        train(parse_config(raw))
    assert not (tmp_path / "runs" / "s" / "metrics.jsonl").exists()
