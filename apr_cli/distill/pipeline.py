"""The training loop: a frozen teacher, a student, and batches from any BatchSource."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch import nn

from apr_cli.data.source import BatchSource, SyntheticBatchSource
from apr_cli.distill import parallel as parallel_lib
from apr_cli.distill.backend import Backend, select_backend
from apr_cli.distill.compile_policy import choose_compile, fall_back_to_eager
from apr_cli.distill.losses import IGNORE_INDEX, LossOptions
from apr_cli.distill.on_policy import CORPUS, STUDENT_SAMPLES, TEACHER_SAMPLES, SampledBatches
from apr_cli.distill.options import TrainConfig
from apr_cli.distill.topk_loss import TopKTeacher
from apr_cli.errors import AprError

if TYPE_CHECKING:
    from apr_cli.teacher_cache.reader import TeacherCache


@dataclass(frozen=True)
class StepMetrics:
    step: int  # 1-based
    steps: int
    loss: float
    kd_loss: float
    ce_loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    sec_per_step: float
    aux_loss: float | None = None  # the router's load-balancing loss, for a Qwen3-MoE student
    kind: str | None = None  # off-policy | on-policy | teacher-samples; None: no sampling run
    generated: float = 0.0  # mean generated tokens per row (sampled steps)
    sample_s: float = 0.0  # of sec_per_step, the time spent sampling


@dataclass(frozen=True)
class TrainResult:
    initial_loss: float
    final_loss: float
    best_loss: float
    steps: int
    tokens: int
    wall_s: float

    @property
    def sec_per_step(self) -> float:
        return self.wall_s / self.steps

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0


class Reporter(Protocol):
    """Where step metrics go (terminal, log file, metrics.jsonl); the loop does not care."""

    def on_step(self, metrics: StepMetrics) -> None: ...


class TrainingDiverged(AprError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"loss became {loss} at step {step}; stopping", exit_code=3)


class Pipeline:
    """Trains `student` to match a frozen `teacher` (or the labels alone when teacher is None)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        config: TrainConfig,
        source: BatchSource | None = None,
        backend: Backend | None = None,
        parallel: str = "ddp",
        teacher_cache: TeacherCache | None = None,
        sampler: SampledBatches | None = None,
    ):
        """`teacher_cache` stands in for `teacher` (then None): its rows are read by the windows
        `source` (a ShardBatchSource) hands out, so shuffling, resume and ranks all line up."""
        self.config = config
        self.sampler = sampler  # builds the batches of on-policy steps
        self.backend = backend or select_backend("cpu", "fp32")
        device, world = self.backend.device, self.backend.world_size
        self.student = student.to(device).train()
        self.teacher = teacher
        self.sharded_teacher = teacher is not None and parallel == "fsdp" and world > 1
        self.teacher_cache = teacher_cache
        self.teacher_weight = None if teacher is None else teacher.output_weight
        if teacher_cache is not None and teacher_cache.kind == "hidden":
            self.teacher_weight = teacher_cache.output_weight().to(device)
        # Compiled callables share parameters with the modules, which stay plain for saving.
        self.teacher_forward = None if teacher is None else teacher.hidden_states
        if teacher is not None:
            teacher.to(device).eval().requires_grad_(False)
        if self.sharded_teacher:
            self.teacher_forward = parallel_lib.shard_teacher(teacher)
        self.compiled = choose_compile(config.compile, self.backend.device, config.steps)
        if self.compiled.any and config.compile is None:
            fall_back_to_eager()
        if teacher is not None and self.compiled.models:
            self.teacher_forward = torch.compile(self.teacher_forward)
        self.source = source or SyntheticBatchSource(
            student.config.vocab_size, rank=self.backend.rank, world_size=world
        )
        if config.activation_checkpointing:
            parallel_lib.checkpoint_blocks(student)
        # Parameters are wrapped (DDP) or sharded (FSDP2) before the optimizer sees them.
        self.model = parallel_lib.wrap(
            parallel_lib.StudentLoss(student, self.compiled), self.backend, parallel
        )
        params = list(self.model.parameters())
        self.optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},  # norms, biases
            ],
            lr=config.lr,
            betas=(0.9, 0.95),
            # One kernel per parameter for the whole update: on a 2-core CPU 5x the default
            # per-operation loop over the (V, C) embedding (docs/performance.md).
            fused=True,
        )
        self.loss_options = LossOptions(
            kind=config.loss,
            temperature=config.temperature,
            alpha=config.alpha,
            beta=config.beta,
            chunk_tokens=config.loss_chunk,
            vocab_size=config.vocab_size,
        )
        # The student's own samples are scored by the teacher alone: CE on them would teach the
        # student its own mistakes. Teacher samples keep the run's loss (sequence-level KD).
        self.sampled_loss_options = self.loss_options
        if sampler is not None and sampler.kind == STUDENT_SAMPLES:
            self.sampled_loss_options = replace(
                self.loss_options, kind=sampler.options.on_policy_loss, alpha=1.0
            )
        self.step = 0  # optimizer steps taken
        self.losses: list[float] = []  # one per step taken
        self.train_seconds = 0.0  # time spent in steps, summed over resumed segments

    def with_batch_source(self, source: BatchSource) -> Pipeline:
        """Train on batches from `source` from now on."""
        self.source = source
        return self

    def train(
        self, reporter: Reporter | None = None, should_stop: Callable[[], bool] | None = None
    ) -> TrainResult:
        """Run the remaining optimizer steps, reporting each; `should_stop` ends early."""
        while self.step < self.config.steps:
            metrics = self.train_step()
            if reporter is not None:
                reporter.on_step(metrics)
            if should_stop is not None and should_stop():
                break
        return self.result()

    def result(self) -> TrainResult:
        """Losses and time over every step taken so far, across resumes."""
        return TrainResult(
            initial_loss=self.losses[0],
            final_loss=self.losses[-1],
            best_loss=min(self.losses),
            steps=len(self.losses),
            tokens=len(self.losses) * self.config.batch_size * self.config.seq_len,
            wall_s=self.train_seconds,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit for bit: weights, optimizer, data, RNG, history.

        Collective under data parallelism; rank 0's copy is the one to save (the data position
        is global, so every rank's source holds the same state).
        """
        return {
            "step": self.step,
            "student": self.student_state(),
            "optimizer": parallel_lib.full_optimizer_state(self.model, self.optimizer),
            "source": self.source.state_dict(),
            "sampler": None if self.sampler is None else self.sampler.state_dict(),
            "rng": rng_state(),
            "losses": list(self.losses),
            "train_seconds": self.train_seconds,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state["step"]
        parallel_lib.load_full_model_state(self.model, state["student"])
        parallel_lib.load_full_optimizer_state(self.model, self.optimizer, state["optimizer"])
        self.source.load_state_dict(state["source"])
        if self.sampler is not None:
            self.sampler.load_state_dict(state["sampler"])
        set_rng_state(state["rng"])
        self.losses = list(state["losses"])
        self.train_seconds = state["train_seconds"]

    def train_step(self) -> StepMetrics:
        """One optimizer step over `grad_accum` micro-batches.

        The step line's numbers are the one device-to-host copy: nothing else waits for the
        device, so the CPU queues the next micro-batch while the GPU works on this one.
        """
        cfg, device = self.config, self.backend.device
        t0 = time.perf_counter()
        lr = cfg.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        world = self.backend.world_size
        micro = cfg.batch_size // (cfg.grad_accum * world)  # rows per rank per micro-batch
        sampled = self.sampler is not None and self.sampler.samples_at(self.step)
        if sampled:
            batches = [self.sampled_batch(micro) for _ in range(cfg.grad_accum)]
        else:
            batches = [self.next_batch(micro) for _ in range(cfg.grad_accum)]
        sample_s = time.perf_counter() - t0 if sampled else 0.0
        loss_options = self.sampled_loss_options if sampled else self.loss_options
        # Weigh micro-batches by their share of the global batch's tokens, so accumulation and
        # data parallelism both equal one big batch; DDP/FSDP average gradients, hence * world.
        # Counted on the CPU copies of the labels; the global total stays on the device.
        counts = [int((labels != IGNORE_INDEX).sum()) for _, labels, _ in batches]
        total = torch.full((), float(sum(counts)), device=device)
        total = parallel_lib.all_reduce_sum(total, self.backend).clamp(min=1.0)
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(4, device=device)  # loss, kd, ce, aux over the global batch
        for i, (inputs, labels, windows) in enumerate(batches):
            inputs, labels = to_device(inputs, device), to_device(labels, device)
            weight = counts[i] / total  # () on the device
            teacher = self.teacher_outputs(inputs, windows)
            last = i == len(batches) - 1
            with parallel_lib.gradient_sync(self.model, last), self.backend.autocast():
                parts = self.model(inputs, labels, teacher, self.teacher_weight, loss_options)
            (parts[0] * (weight * world)).backward()
            sums += weight * parts.detach()
        parallel_lib.all_reduce_sum(sums, self.backend)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        # The step's one device-to-host copy: the step line's numbers and the global token count.
        step_values = torch.cat([sums, grad_norm.reshape(1).to(sums.dtype), total.reshape(1)])
        loss, kd, ce, aux, norm, tokens = to_host(step_values)
        if not math.isfinite(loss):  # the step is not taken: self.step counts completed steps
            raise TrainingDiverged(self.step + 1, loss)
        self.step += 1
        self.optimizer.step()
        elapsed = time.perf_counter() - t0
        self.losses.append(loss)
        self.train_seconds += elapsed
        return StepMetrics(
            step=self.step,
            steps=cfg.steps,
            loss=loss,
            kd_loss=kd,
            ce_loss=ce,
            lr=lr,
            grad_norm=norm,
            tokens_per_s=cfg.batch_size * cfg.seq_len / elapsed,
            sec_per_step=elapsed,
            aux_loss=aux if self.student.config.arch.moe else None,
            kind=None if self.sampler is None else self.sampler.kind if sampled else CORPUS,
            generated=tokens / cfg.batch_size if sampled else 0.0,
            sample_s=sample_s,
        )

    def next_batch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
        """(inputs, labels, the dataset windows they come from when a cache needs them)."""
        seq_len = self.config.seq_len
        windows = None
        if self.teacher_cache is not None:
            windows = self.source.batch_windows(rows, seq_len)
        return *self.source.next_batch(rows, seq_len), windows

    def teacher_outputs(
        self, inputs: torch.Tensor, windows: list[int] | None
    ) -> torch.Tensor | TopKTeacher | None:
        """The teacher's side of the loss: final hidden states (B, T, C_t) or top-k outputs."""
        if self.teacher_cache is not None:
            return self.teacher_cache.read(windows).to(self.backend.device)
        return self.teacher_hidden(inputs)

    def sampled_batch(self, rows: int) -> tuple[torch.Tensor, torch.Tensor, None]:
        """A micro-batch continued by the student (or teacher), no gradients, KV cache."""
        teacher = self.sampler.kind == TEACHER_SAMPLES
        model = self.teacher if teacher else self.student
        # FSDP2 keeps the student's root (embeddings, final norm) sharded outside its forward.
        gather = not teacher and hasattr(self.model, "unshard")
        if gather:
            self.model.unshard()
        try:
            # In the model's own dtype: the KV cache has the weights' dtype, which autocast's
            # bf16 keys would not match.
            batch = self.sampler.next_batch(model, rows, self.config.seq_len)
        finally:
            if gather:
                self.model.reshard()
            if not teacher:
                self.student.train()  # generation left it in eval mode
        return *batch, None  # sampled rows come from no dataset window

    def teacher_hidden(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """Teacher final hidden states (B, T, C_t), with no autograd state."""
        if self.teacher is None:
            return None
        # FSDP2 gathers shards into live parameters, which inference mode would not allow.
        no_autograd = torch.no_grad() if self.sharded_teacher else torch.inference_mode()
        with no_autograd, self.backend.autocast():
            hidden = self.teacher_forward(inputs)
        # Inference tensors cannot be saved for backward; hidden states are small to copy.
        return hidden.clone()

    def student_state(self) -> dict[str, torch.Tensor]:
        """The student's full weights (collective under FSDP2; complete on rank 0)."""
        return parallel_lib.full_model_state(self.model)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU batch on `device`; to CUDA through pinned memory, so the copy does not block."""
    if device.type != "cuda" or t.device.type != "cpu":  # sampled rows are already there
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_host(t: torch.Tensor) -> list[float]:
    """The step's one allowed device-to-host copy, exempt from a sync debug mode set by a test."""
    if t.device.type != "cuda":
        return t.tolist()
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)
    try:
        return t.tolist()
    finally:
        torch.cuda.set_sync_debug_mode(mode)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) generator states, in types a weights-only load accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.copy()), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        # This process's GPU only: a resume may run on a host with another GPU count.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, list):  # older checkpoints kept every GPU's state; the first is ours
            cuda = cuda[0]
        torch.cuda.set_rng_state(cuda)
