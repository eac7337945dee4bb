"""The Python API: the README's example runs as written; recipes as paths, mappings and configs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import distill
from distill.api import overrides_of
from distill.errors import ConfigError
from distill.recipe import parse_config

REPO = Path(__file__).resolve().parent.parent


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    block = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(REPO / "configs")
    exec(compile(block, "README.md", "exec"), {})
    assert "top-1" in capsys.readouterr().out
    assert (tmp_path / "runs" / "api" / "student_hard" / "student.safetensors").is_file()


def test_recipe_forms_and_overrides(tiny_recipe):
    raw = tiny_recipe("api", trainer={"epochs": 1, "batch_size": 32})
    from_dict = distill.train(raw, seed=3, trainer__batch_size=16)
    assert from_dict.cfg.seed == 3 and from_dict.cfg.trainer.batch_size == 16 and len(from_dict.history) == 1
    from_cfg = distill.train(parse_config(raw), **{"name": "api2", "trainer.epochs": 2})
    assert from_cfg.cfg.name == "api2" and len(from_cfg.history) == 2
    with pytest.raises(ConfigError, match="trainer.epochs"):
        distill.train(raw, trainer__epochs=0)


def test_overrides_are_cli_overrides():
    assert overrides_of({"trainer__epochs": 3, "pool.weights": [1, 2], "name": "x"}) == [
        "trainer.epochs=3", "pool.weights=[1, 2]", 'name="x"']


def test_import_distill_stays_light():
    import subprocess
    import sys

    code = "import sys, distill; print('torch' in sys.modules, hasattr(distill, 'train'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]
