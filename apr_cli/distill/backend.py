"""Where the math runs: device, precision and determinism, decided once per run."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from apr_cli.errors import AprError

DEVICES = ("auto", "cuda", "cpu")
DTYPES = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Backend:
    device: torch.device
    autocast_dtype: torch.dtype | None  # bf16 for the matmuls; None means plain fp32
    rank: int = 0  # this process's rank under torchrun
    world_size: int = 1  # processes training together

    @property
    def is_main(self) -> bool:
        """Rank 0 alone prints and writes files."""
        return self.rank == 0

    @property
    def name(self) -> str:
        return "cuda" if self.device.type == "cuda" else "cpu"

    @property
    def compute_dtype(self) -> str:
        return "bfloat16" if self.autocast_dtype is torch.bfloat16 else "float32"

    @property
    def teacher_dtype(self) -> torch.dtype:
        """The frozen teacher is stored in the compute dtype: it never needs fp32 master weights."""
        return self.autocast_dtype or torch.float32

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def describe(self) -> dict:
        info = {"device": str(self.device), "dtype": self.compute_dtype}
        if self.world_size > 1:
            info["world_size"] = self.world_size
            info["process_group"] = dist.get_backend()
        if self.device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(self.device)
        return info


def select_backend(device: str = "auto", dtype: str = "auto") -> Backend:
    """auto: CUDA (TF32 matmuls) when available, else CPU; matmuls in `dtype` under autocast.

    dtype auto: bf16 on CUDA, fp32 on the CPU (there bf16 pays only for large matmuls, see
    docs/performance.md; ask for it with dtype="bf16"). Under torchrun (WORLD_SIZE > 1 in the
    environment) this joins the process group: nccl on CUDA, gloo on CPU, one GPU per local rank.
    """
    if device not in DEVICES:
        raise AprError(f"--device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if dtype not in DTYPES:
        raise AprError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    use_cuda = resolve_device(device).type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if world_size > 1 else 0
    if dtype == "auto":
        dtype = "bf16" if use_cuda else "fp32"
    autocast_dtype = torch.bfloat16 if dtype == "bf16" else None
    if not use_cuda:
        return Backend(torch.device("cpu"), autocast_dtype, rank, world_size)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return Backend(
        torch.device("cuda", torch.cuda.current_device()), autocast_dtype, rank, world_size
    )


def resolve_device(name: str) -> torch.device:
    """A torch device that exists here: auto (CUDA when available, else CPU), cpu, cuda, cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise AprError(f"--device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AprError(f"--device {name}: no CUDA device is visible to torch")
    return device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so a CPU run is repeatable bit for bit."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
