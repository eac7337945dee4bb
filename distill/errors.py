"""The engine's user-facing errors: each message names the field or file, what is wrong and what
is allowed. The CLI prints them on one screen and exits 2 (no traceback)."""
from __future__ import annotations


class ConfigError(ValueError):
    """A recipe is wrong. The message names the field, the bad value and what is allowed."""


class DataError(ValueError):
    """The data on disk does not match what the recipe says; the message names the file."""


class ArtefactError(ValueError):
    """A file on disk is missing, corrupted or does not belong to this job; the message names it."""


class TrainingError(RuntimeError):
    """Training stopped (e.g. a non-finite loss); the last good checkpoint is intact. The message
    names the step, the loss terms and how to resume."""


USER_ERRORS = (ConfigError, DataError, ArtefactError)
