"""Training checkpoints in a run directory: written atomically, the last K kept, loaded safely."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from apr_cli.errors import AprError
from apr_cli.fsutil import atomic_write

CHECKPOINT_DIR = "checkpoints"
NAME = re.compile(r"^step-(\d{8})\.pt$")
IO_ERROR_EXIT = 4


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
            exit_code=IO_ERROR_EXIT,
        ) from None
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def os_reason(error: BaseException) -> str:
    """The operating system's words for a failed write (e.g. 'No space left on device')."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__context__
    return str(error)


def load_latest_checkpoint(run_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The newest complete checkpoint; weights-only loading never runs code."""
    found = list_checkpoints(run_dir)
    if not found:
        raise AprError(f"--resume {run_dir}: no checkpoint to resume from")
    path = found[-1]
    try:
        return path, torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file: say which, never a traceback
        raise AprError(f"checkpoint {path}: cannot be read ({e})") from None
