"""Progress in a log file, per-step metrics and TensorBoard event files."""
from __future__ import annotations

import io
import json

from distill.progress import Progress
from distill.recipe import parse_config
from distill.runner import train


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_plain_lines_when_not_a_terminal(monkeypatch):
    monkeypatch.setenv("DISTILL_PROGRESS_EVERY", "30")
    out, clock = io.StringIO(), FakeClock()
    bar = Progress(total=100, desc="labels s", unit="img", stream=out, clock=clock)
    for _ in range(10):
        clock.t += 1
        bar.update(5)  # 10 s: no line yet
    assert out.getvalue() == ""
    bar.set_postfix(loss="0.412")
    clock.t += 25
    bar.update(10)  # 35 s, 60 of 100
    line = out.getvalue().strip()
    assert line.startswith("[labels s] 60/100 (60%)") and "img/s" in line and "ETA 0:00:23" in line
    assert line.endswith("loss 0.412")
    bar.close()  # a final line says where it ended
    assert out.getvalue().strip().splitlines()[-1].startswith("[labels s] 60/100")


def test_silent_when_disabled_or_not_rank_zero(monkeypatch):
    out, clock = io.StringIO(), FakeClock()
    monkeypatch.setenv("DISTILL_PROGRESS_EVERY", "0")
    bar = Progress(range(3), stream=out, clock=clock, enabled=False)
    assert list(bar) == [0, 1, 2] and out.getvalue() == ""
    monkeypatch.setenv("RANK", "1")
    assert list(Progress(range(3), stream=out, clock=clock)) == [0, 1, 2] and out.getvalue() == ""


def test_step_metrics_and_tensorboard(tiny_recipe):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    raw = tiny_recipe("tb", log={"tensorboard": True, "every_steps": 2}, trainer={"epochs": 2, "batch_size": 16})
    res = train(parse_config(raw))
    rows = [json.loads(line) for line in (res.run_dir / "metrics_steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4, 5, 6, 8, 10, 11]  # every 2nd + each epoch's last of 6
    assert {"loss", "ce", "lr", "images_per_second", "data_seconds", "compute_seconds", "teacher_seconds"} <= set(rows[0])
    events = EventAccumulator(str(res.run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "epoch/test_top1", "epoch/train_loss"} <= set(tags)
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in rows]
    assert abs(events.Scalars("epoch/test_top1")[-1].value - res.final["test_top1"]) < 1e-4  # float32 in the file


def test_resume_drops_step_rows_of_unsaved_epochs(tiny_recipe):
    raw = tiny_recipe("rs", log={"every_steps": 1}, trainer={"epochs": 2, "batch_size": 16})
    first = train(parse_config(raw))
    path = first.run_dir / "metrics_steps.jsonl"
    rows = path.read_text().splitlines()
    ckpt = first.run_dir / "checkpoints" / "last.safetensors"
    # a run that died in epoch 3 after its checkpoint of epoch 2: rows of epoch 3 were written
    path.write_text("".join(r + "\n" for r in rows) + json.dumps({"epoch": 3, "step": 99, "loss": 1.0}) + "\n")
    raw["trainer"]["epochs"] = 2
    assert ckpt.is_file()
    train(parse_config(raw))  # resumes after epoch 2: nothing to train, epoch-3 rows dropped
    assert path.read_text().splitlines() == rows
