"""Writes that never leave a half-written file behind: temp file, fsync, rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Replace `path` with what `write` puts in a file; a crash leaves the old file or the new."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with naming(path):
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600; give the usual mode
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def append_text(path: Path, text: str) -> None:
    """Append to a log file and flush, so a crash keeps what was written."""
    with naming(path), open(path, "a") as f:
        f.write(text)


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """Name `path` in OSErrors raised inside: a failed write() does not say which file."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def follow_umask(path: Path) -> None:
    """Give directory `path` and everything under it the modes a plain mkdir/open would have.

    mkdtemp makes 0700 directories and safetensors 0600 files; a user's outputs should be as
    readable as any other file they write.
    """
    mask = current_umask()
    for root, _dirs, files in os.walk(path):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
