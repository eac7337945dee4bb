"""Per-step scalars of a training run: `metrics_steps.jsonl` and, when asked, TensorBoard.

Every `log.every_steps` micro-steps (and at the last step of an epoch) the trainer hands over one
row: each loss term, lr, images/s, seconds waiting for data vs computing, teacher seconds, GPU
memory where there is a GPU. Epoch records (test accuracy, ...) go to TensorBoard too. On resume
the rows of epochs the checkpoint does not hold are dropped, so a re-run epoch is not logged twice.
TensorBoard is optional (`pip install 'distill[tensorboard]'`); only rank 0 writes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from distill.artefacts import read_jsonl, write_text
from distill.errors import ConfigError

STEPS_FILE = "metrics_steps.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _finite(v: float) -> float | None:
    return v if math.isfinite(v) else None  # strict JSON: no NaN/inf tokens


class StepLog:
    def __init__(self, run_dir: Path, every_steps: int = 10, tensorboard: bool = False, enabled: bool = True):
        self.path, self.every, self.enabled = Path(run_dir) / STEPS_FILE, every_steps, enabled
        self.writer, self._file, self._tensorboard_dir = None, None, None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package
            except ImportError as err:
                raise ConfigError(f"log.tensorboard: true needs the tensorboard package ({err}); "
                                  f"pip install 'distill[tensorboard]', or set log.tensorboard: false") from None
            self._writer_class, self._tensorboard_dir = SummaryWriter, Path(run_dir) / TENSORBOARD_DIR

    def _open(self) -> None:
        """Files are created on the first row, so a refused run writes nothing."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a")
        if self._tensorboard_dir is not None and self.writer is None:
            self.writer = self._writer_class(str(self._tensorboard_dir))

    def due(self, step: int, last_of_epoch: bool) -> bool:
        return self.enabled and (step % self.every == 0 or last_of_epoch)

    def resume(self, epochs_done: int) -> None:
        """Keep only the rows of epochs the checkpoint holds (a fresh run: none)."""
        if not self.enabled:
            return
        rows = [r for r in read_jsonl(self.path) if r["epoch"] <= epochs_done] if self.path.is_file() else []
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def step(self, epoch: int, step: int, scalars: dict[str, float]) -> None:
        """One row: `epoch` counts from 1, `step` is the run's micro-step counter."""
        self._open()
        row = {"epoch": epoch, "step": step, **{k: _finite(float(v)) for k, v in scalars.items()}}
        self._file.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for k, v in scalars.items():
                if math.isfinite(float(v)):
                    self.writer.add_scalar(f"train/{k}", float(v), step)

    def epoch(self, step: int, record: dict[str, Any]) -> None:
        """The epoch's record (test accuracy, epoch loss, ...) as TensorBoard scalars at `step`."""
        if not self.enabled:
            return
        self._open()
        self._file.flush()
        if self.writer is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and k != "epoch":
                    self.writer.add_scalar(f"epoch/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
