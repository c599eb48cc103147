"""Training checkpoints in a run directory: written atomically, the last K kept, loaded safely."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from apr_cli.errors import WRITE_FAILED, AprError, os_reason
from apr_cli.fsutil import atomic_write

CHECKPOINT_DIR = "checkpoints"
NAME = re.compile(r"^step-(\d{8})\.pt$")
CHECKPOINT_KEYS = ("pipeline", "log_bytes", "options")  # what RunReporter.checkpoint saves


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp files of an interrupted write are not listed)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if NAME.match(p.name))


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as step-NNNNNNNN.pt, then drop all but the newest `keep`."""
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    try:
        atomic_write(path, lambda f: torch.save(state, f))
    except (OSError, RuntimeError) as e:  # torch's zip writer reports a failed write as either
        raise AprError(
            f"checkpoint {path}: could not be written ({os_reason(e)}); "
            "the previous checkpoint is intact",
            exit_code=WRITE_FAILED,
        ) from None
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any], list[tuple[Path, str]]]:
    """The newest checkpoint that loads, and the newer ones that did not, with the reason.

    Weights-only loading never runs code.
    """
    found = list_checkpoints(run_dir)
    if not found:
        raise AprError(f"--resume {run_dir}: no checkpoint to resume from")
    skipped: list[tuple[Path, str]] = []
    for path in reversed(found):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
            if missing or "step" not in state["pipeline"]:
                raise ValueError(f"not an apr checkpoint: no {(missing or ['step'])[0]!r}")
            return path, state, skipped
        except Exception as e:  # corrupt or foreign: one line, never a traceback
            skipped.append((path, load_failure(e)))
    newest, reason = skipped[0]
    raise AprError(
        f"--resume {run_dir}: no checkpoint can be read (newest: {newest.name}: {reason}); "
        "start a new run instead"
    )


def load_failure(error: Exception) -> str:
    """Why torch.load failed, in one sentence, without its advice to load unsafely."""
    if isinstance(error, pickle.UnpicklingError) and error.__context__ is not None:
        error = error.__context__  # the unpickler's own reason; the outer one is advice
    return os_reason(error).split(". ")[0]
