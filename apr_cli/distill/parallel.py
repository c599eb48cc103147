"""Data parallelism: the student wrapped in DDP or sharded with FSDP2, and full state dicts.

torch.distributed's FSDP, checkpoint and tensor packages are imported inside the functions that
use them: together they take seconds to import, which every `apr distill --plan` and every
single-process run would otherwise pay for nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from apr_cli.distill.backend import Backend
from apr_cli.distill.compile_policy import CompileChoice
from apr_cli.distill.losses import LossOptions, distill_loss
from apr_cli.distill.topk_loss import TopKTeacher, topk_distill_loss
from apr_cli.errors import AprError
from apr_cli.model.checkpoint import SAFETENSORS_DTYPES, read_headers, weight_files
from apr_cli.model.mlp import RouterStats

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

M_MMAP_THRESHOLD = -3  # mallopt's parameter number, from glibc's malloc.h


class StudentLoss(nn.Module):
    """The student's forward pass and the loss as one module.

    DDP and FSDP2 act around a module's forward; putting the loss inside it means the output
    projection (tied to the embeddings) is gathered and its gradient synchronised like any other.
    """

    def __init__(self, student: nn.Module, compiled: CompileChoice):
        super().__init__()
        self.student = student
        self.hidden = student.hidden_states
        if compiled.models:
            self.hidden = torch.compile(student.hidden_states)
        self.compile_blocks = compiled.loss_blocks

    def forward(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        teacher: torch.Tensor | TopKTeacher | None,
        teacher_weight: torch.Tensor | None,
        loss: LossOptions,
    ) -> torch.Tensor:
        """(4,) tensor: loss, kd, ce, and the router's load-balancing loss (0 when dense).

        `teacher`: final hidden states (B, T, C_t) projected by `teacher_weight`, or a top-k
        cache's outputs. A Qwen3-MoE student's loss includes router_aux_loss_coef times the
        load-balancing loss, as transformers trains it, so its experts keep receiving tokens.
        """
        router = RouterStats()
        hidden = self.hidden(inputs, router=router)  # (B, T, C)
        weight = self.student.output_weight
        if isinstance(teacher, TopKTeacher):
            parts = topk_distill_loss(hidden, weight, teacher, labels, **asdict(loss))
        else:
            parts = distill_loss(
                hidden,
                weight,
                teacher,
                teacher_weight,
                labels,
                **asdict(loss),
                compile_blocks=self.compile_blocks,
            )
        aux = router.loss(parts.loss.device)
        loss = parts.loss + self.student.config.router_aux_loss_coef * aux
        return torch.stack([loss, parts.kd, parts.ce, aux.detach()])


def checkpoint_blocks(student: nn.Module) -> None:
    """Keep only each block's input for backward and recompute the rest (activation
    checkpointing). The wrapper leaves parameter names and state dicts unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointWrapper,
        checkpoint_wrapper,
    )

    layers = student.model.layers
    for i, block in enumerate(layers):
        if not isinstance(block, CheckpointWrapper):
            layers[i] = checkpoint_wrapper(block)


def wrap(module: StudentLoss, backend: Backend, parallel: str) -> nn.Module:
    """DDP (replicated student) or FSDP2 (each block and the rest sharded) when distributed."""
    if backend.world_size == 1:
        return module
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        mp = mixed_precision(backend)
        for block in module.student.model.layers:
            fully_shard(block, mp_policy=mp)
        return fully_shard(module, mp_policy=mp)
    device_ids = [backend.device.index] if backend.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def mixed_precision(backend: Backend) -> MixedPrecisionPolicy:
    """On CUDA, gathered student weights in bf16 for compute and gradients reduced in fp32 (the
    fp32 shards stay the optimizer's master copy); on the CPU everything stays fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if backend.autocast_dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=backend.autocast_dtype, reduce_dtype=torch.float32)


class TeacherHidden(nn.Module):
    """The teacher's final hidden states as a module's forward, so FSDP2 has a root to act on."""

    def __init__(self, teacher: nn.Module):
        super().__init__()
        self.teacher = teacher

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.teacher.hidden_states(inputs)  # (B, T, C_t)


def shard_teacher(teacher: nn.Module) -> nn.Module:
    """The frozen teacher's blocks sharded at rest; embeddings, norm and head stay whole.

    Returns the module to call for hidden states. Each block is gathered for its forward and
    resharded after it (there is no backward to do it for a frozen teacher); the next block's
    gather is issued as each block starts, so communication overlaps compute. Without the root
    above them each block would be its own FSDP2 root, and a root keeps its gathered weights.
    """
    from torch.distributed.fsdp import fully_shard

    shard_blocks(teacher)
    fix_mmap_threshold()
    whole = {p for name, p in teacher.named_parameters() if not name.startswith("model.layers.")}
    return fully_shard(TeacherHidden(teacher), ignored_params=whole)


def fix_mmap_threshold() -> None:
    """Have glibc return each freed gathered weight to the system instead of keeping it.

    Every teacher forward allocates and frees each block's full weights. glibc serves large
    allocations with their own memory maps, but after freeing one it raises that threshold to
    the freed size (up to 32 MiB), so the next ones come from its heap and stay resident once
    freed: on CPU a 181M teacher's rank kept ~500 MiB of gathered weights after one forward.
    A fixed threshold turns the raising off. No-op without glibc's mallopt (macOS).
    """
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, 1 << 20)


def shard_blocks(teacher: nn.Module) -> None:
    """fully_shard each block once (on the meta device too), prefetching the next in forward."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    blocks = list(teacher.model.layers)
    if isinstance(blocks[0], FSDPModule):  # already sharded by load_local_shards
        return
    for block in blocks:
        fully_shard(block, reshard_after_forward=True)
    for block, following in zip(blocks, blocks[1:], strict=False):
        block.set_modules_to_forward_prefetch([following])


def load_local_shards(model: nn.Module, folder: Path, device: torch.device) -> None:
    """Give a meta model its checkpoint's weights with the blocks sharded, reading only this
    rank's rows of each block tensor: a rank never holds the whole teacher, not even to load.

    FSDP2 shards dim 0 as torch.chunk does: rank r holds rows r*c .. (r+1)*c, c = ceil(n/W).
    The rows are read with plain file reads, not through a memory map: every mapped page a rank
    touches counts in its resident set (on CPU the load's peak rose by 2.6x the rank's shards).
    """
    from torch.distributed.tensor import DTensor

    shard_blocks(model)
    model.to_empty(device=device)
    found = read_headers(weight_files(folder))
    offsets = {file: tensor_offsets(file) for file in {file for file, _, _ in found.values()}}
    rank, world = dist.get_rank(), dist.get_world_size()
    with contextlib.ExitStack() as stack, torch.no_grad():
        files = {file: stack.enter_context(open(file, "rb", buffering=0)) for file in offsets}
        for name, param in model.named_parameters():  # a tied head is the embedding's name
            file, shape, dtype = found[name]
            local, start = param, 0
            if isinstance(param, DTensor):
                local = param.to_local()
                start = min(rank * -(-shape[0] // world), shape[0])
            row_bytes = math.prod(shape[1:]) * SAFETENSORS_DTYPES[dtype].itemsize
            files[file].seek(offsets[file][name] + start * row_bytes)
            read_into(files[file], local, SAFETENSORS_DTYPES[dtype])


def tensor_offsets(file: Path) -> dict[str, int]:
    """Where each tensor's bytes start in a safetensors file: 8 bytes of header length, the
    JSON header (data_offsets relative to its end), then the data."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {k: 8 + size + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def read_into(f: BinaryIO, target: torch.Tensor, file_dtype: torch.dtype) -> None:
    """Fill `target` (contiguous) from the file's position, converting from `file_dtype`;
    straight into its memory when it is a CPU tensor of that dtype."""
    direct = target.device.type == "cpu" and target.dtype == file_dtype
    buffer = target if direct else torch.empty(target.shape, dtype=file_dtype)
    view = memoryview(buffer.detach().view(-1).view(torch.uint8).numpy())
    done = 0
    while done < len(view):  # one read returns at most ~2 GiB on Linux
        n = f.readinto(view[done:])
        if not n:
            raise AprError(f"{f.name}: the file ends before its header says")
        done += n
    if not direct:
        target.copy_(buffer)


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on accumulation micro-batches but the last."""
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    yield


def all_reduce_sum(t: torch.Tensor, backend: Backend) -> torch.Tensor:
    if backend.world_size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, backend: Backend) -> bool:
    """True when `flag` is set on any rank, so every rank stops at the same step."""
    if backend.world_size == 1:
        return flag
    t = torch.tensor([float(flag)], device=backend.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def full_state_options(cpu_offload: bool = True) -> Any:
    """StateDictOptions for whole (unsharded) state dicts, gathered to the CPU when saving."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The student's full weights on the CPU (collective; empty on ranks > 0 under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    prefix = "student."
    state = get_model_state_dict(model, options=full_state_options())
    return {k.removeprefix(prefix): v for k, v in state.items()}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    full = {f"student.{k}": v for k, v in state.items()}
    set_model_state_dict(model, full, options=full_state_options(cpu_offload=False))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=full_state_options())


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=full_state_options(cpu_offload=False))
