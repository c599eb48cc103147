"""Peak memory of a measured region, on CUDA (allocator stats) or CPU (the process's VmHWM)."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def proc_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())[1])


def reset_peak(device: str | torch.device) -> int:
    """Start a measured region; returns the bytes held before it."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    return proc_kib("VmRSS") * 1024


def peak(device: str | torch.device) -> int:
    """Peak bytes held since `reset_peak`."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated()
    return proc_kib("VmHWM") * 1024
