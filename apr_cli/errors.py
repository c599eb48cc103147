"""The one exception type the library raises for bad input; the CLI turns it into one line."""

from __future__ import annotations

import errno

WRITE_FAILED = 4  # exit code of a failed write: disk full, file too large, quota
# Errors that mean "the disk could not take the write", as opposed to bad input.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


class AprError(Exception):
    """A user-facing error: the message names the flag or file and what is wrong."""

    label = "error"  # what the CLI prints before the message

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def os_errors(error: BaseException) -> list[OSError]:
    """The OSErrors in an error's chain (torch and safetensors wrap the OS's own)."""
    chain: list[OSError] = []
    seen: BaseException | None = error
    while seen is not None and len(chain) < 16:
        if isinstance(seen, OSError):
            chain.append(seen)
        seen = seen.__context__ or seen.__cause__
    return chain


def os_reason(error: BaseException) -> str:
    """The operating system's words for a failure (e.g. 'No space left on device'), one line."""
    for e in os_errors(error):
        if e.strerror:
            return e.strerror
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_write_failure(error: BaseException) -> bool:
    """A disk that is full or a file over its size limit, anywhere in the error's chain."""
    return any(e.errno in WRITE_ERRNOS for e in os_errors(error))


def from_os_error(error: OSError) -> AprError:
    """An OSError as one line naming its file: exit 4 for a failed write, else 2."""
    where = error.filename if error.filename is not None else "apr"
    if is_write_failure(error):
        return AprError(f"{where}: could not be written ({os_reason(error)})", WRITE_FAILED)
    return AprError(f"{where}: {os_reason(error)}")
