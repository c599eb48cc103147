"""Data parallelism: the student wrapped in DDP or sharded with FSDP2, and full state dicts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from apr_cli.distill.backend import Backend
from apr_cli.distill.losses import distill_loss
from apr_cli.distill.topk_loss import TopKTeacher, topk_distill_loss
from apr_cli.model.mlp import RouterStats

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class StudentLoss(nn.Module):
    """The student's forward pass and the loss as one module.

    DDP and FSDP2 act around a module's forward; putting the loss inside it means the output
    projection (tied to the embeddings) is gathered and its gradient synchronised like any other.
    """

    def __init__(self, student: nn.Module, compile: bool = False):
        super().__init__()
        self.student = student
        self.hidden = torch.compile(student.hidden_states) if compile else student.hidden_states

    def forward(
        self,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        teacher: torch.Tensor | TopKTeacher | None,
        teacher_weight: torch.Tensor | None,
        loss_options: dict[str, Any],
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
            parts = topk_distill_loss(hidden, weight, teacher, labels, **loss_options)
        else:
            parts = distill_loss(hidden, weight, teacher, teacher_weight, labels, **loss_options)
        aux = router.loss().to(parts.loss.device)
        loss = parts.loss + self.student.config.router_aux_loss_coef * aux
        return torch.stack([loss, parts.kd, parts.ce, aux.detach()])


def wrap(module: StudentLoss, backend: Backend, parallel: str) -> nn.Module:
    """DDP (replicated student) or FSDP2 (each block and the rest sharded) when distributed."""
    if backend.world_size == 1:
        return module
    if parallel == "fsdp":
        for block in module.student.model.layers:
            fully_shard(block)
        return fully_shard(module)
    device_ids = [backend.device.index] if backend.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def shard_teacher(teacher: nn.Module) -> None:
    """Shard the frozen teacher's blocks; embeddings and head stay whole for the loss."""
    for block in teacher.model.layers:
        fully_shard(block)


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


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The student's full weights on the CPU (collective; empty on ranks > 0 under FSDP)."""
    prefix = "student."
    state = get_model_state_dict(model, options=FULL)
    return {k.removeprefix(prefix): v for k, v in state.items()}


def load_full_model_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    full = {f"student.{k}": v for k, v in state.items()}
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return get_optimizer_state_dict(model, optimizer, options=FULL)


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    set_optimizer_state_dict(
        model, optimizer, state, options=StateDictOptions(full_state_dict=True)
    )
