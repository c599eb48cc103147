"""One distillation run end to end: resolve models and data, train, and leave a run directory."""

from __future__ import annotations

import json
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import apr_cli
from apr_cli.data.source import BatchSource, SyntheticBatchSource
from apr_cli.distill.backend import Backend, seed_everything, select_backend
from apr_cli.distill.pipeline import Pipeline, StepMetrics, TrainConfig, TrainResult
from apr_cli.distill.plot import write_loss_plot
from apr_cli.distill.rundir import RunDirectory, format_step, utc_now
from apr_cli.errors import AprError
from apr_cli.model.checkpoint import (
    init_student_from_teacher,
    load_model,
    parse_teacher_layers,
    save_model,
)
from apr_cli.model.qwen2 import Qwen2ForCausalLM, count_parameters
from apr_cli.model.vocab import shared_vocab_size

DEFAULT_TEACHER = "tiny-teacher"
DEFAULT_STUDENT = "tiny-student"
# A preset teacher starts from random weights and knows nothing; these CE steps on the same
# batches give it something to teach (enough for the synthetic identity task).
PRESET_TEACHER_WARMUP = 50

Emit = Callable[[str], None]


@dataclass
class DistillOptions:
    """Everything `apr distill` was asked for, before anything is loaded."""

    teacher: str = DEFAULT_TEACHER
    student: str = DEFAULT_STUDENT
    student_init: str | None = None  # teacher-layers:0,2,... builds the student from the teacher
    dataset: Path | None = None
    device: str = "auto"
    teacher_warmup: int | None = None  # None: PRESET_TEACHER_WARMUP for a preset teacher, else 0
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class Prepared:
    """Models, data and backend resolved and checked; nothing written yet."""

    options: DistillOptions
    backend: Backend
    teacher: Qwen2ForCausalLM
    student: Qwen2ForCausalLM
    teacher_info: dict[str, Any]
    student_info: dict[str, Any]
    source: BatchSource
    vocab_size: int  # rows both models share; data ids must stay below it
    warnings: list[str]

    @property
    def teacher_warmup(self) -> int:
        if self.options.teacher_warmup is not None:
            return self.options.teacher_warmup
        return PRESET_TEACHER_WARMUP if self.teacher_info["kind"] == "preset" else 0


def prepare(options: DistillOptions) -> Prepared:
    """Resolve and check everything a run needs, failing before any file is written."""
    cfg = options.train
    cfg.validate()
    if options.teacher_warmup is not None and options.teacher_warmup < 0:
        raise AprError(f"--teacher-warmup must be >= 0, got {options.teacher_warmup}")
    backend = select_backend(options.device)
    seed_everything(cfg.seed)
    teacher, teacher_info = load_model(
        options.teacher, dtype=backend.teacher_dtype, device=backend.device, seed=cfg.seed + 1
    )
    if options.student_init is not None:
        layers = parse_teacher_layers(options.student_init, teacher.config.num_hidden_layers)
        student = init_student_from_teacher(teacher, layers).float()
        student_info = {
            "spec": options.student_init,
            "kind": "teacher-layers",
            "layers": layers,
            "path": teacher_info["path"],
            "config": student.config.to_dict(),
            "parameters": count_parameters(student),
            "dtype": "float32",
        }
    else:
        # Student weights stay fp32: they are the optimizer's master copy.
        student, student_info = load_model(
            options.student, dtype=torch.float32, device=backend.device, seed=cfg.seed
        )
    vocab = shared_vocab_size(teacher.config.vocab_size, student.config.vocab_size)
    context = min(teacher.config.max_position_embeddings, student.config.max_position_embeddings)
    cfg.validate(max_seq_len=context)
    if options.dataset is not None:
        from apr_cli.data.shards import ShardBatchSource

        source: BatchSource = ShardBatchSource(options.dataset, vocab_size=vocab)
    else:
        source = SyntheticBatchSource(vocab)
    warnings = []
    if same_model(teacher, student, teacher_info, student_info):
        warnings.append(
            "warning: teacher and student are the same model: there is nothing to distill"
        )
    return Prepared(
        options, backend, teacher, student, teacher_info, student_info, source, vocab, warnings
    )


def same_model(a: Qwen2ForCausalLM, b: Qwen2ForCausalLM, a_info: dict, b_info: dict) -> bool:
    """Same checkpoint folder, or the same shapes holding the same weights."""
    if a_info.get("path") and a_info.get("path") == b_info.get("path") and "layers" not in b_info:
        return True
    if a.config.with_(torch_dtype="") != b.config.with_(torch_dtype=""):
        return False
    b_state = b.state_dict()
    return all(torch.equal(t.float(), b_state[name].float()) for name, t in a.state_dict().items())


def dataset_line(options: DistillOptions) -> str:
    if options.dataset is None:
        return "dataset: (synthetic)"
    return f"dataset: {options.dataset} (real corpus via --dataset)"


def estimate_memory(p: Prepared) -> dict[str, int]:
    """A rough peak: weights, fp32 grads + AdamW moments, activations and logits (bytes)."""
    cfg, t, s = p.options.train, p.teacher.config, p.student.config
    tokens = cfg.batch_size // cfg.grad_accum * cfg.seq_len
    act_bytes = 2 if p.backend.autocast_dtype is not None else 4
    teacher_weights = count_parameters(p.teacher) * act_bytes
    student_states = count_parameters(p.student) * 16  # weights, grads, two moments, fp32
    # ~16 saved tensors of width hidden per layer and token, for backward.
    activations = tokens * s.hidden_size * s.num_hidden_layers * 16 * act_bytes
    # Student logits, their fp32 copy and softmax, and the teacher's: ~6 (tokens, vocab) fp32.
    logits = tokens * max(t.vocab_size, s.vocab_size) * 4 * 6
    total = teacher_weights + student_states + activations + logits
    return {
        "teacher_weights": teacher_weights,
        "student_weights_grads_optimizer": student_states,
        "activations": activations,
        "logits": logits,
        "total": total,
    }


def plan(p: Prepared) -> dict[str, Any]:
    """What a run would do, as the manifest and `--plan` show it."""
    cfg = p.options.train
    return {
        "teacher": p.teacher_info,
        "student": p.student_info,
        "teacher_warmup_steps": p.teacher_warmup,
        "shared_vocab_size": p.vocab_size,
        "data": p.source.describe(),
        "backend": p.backend.describe(),
        "hyperparameters": cfg.to_dict(),
        "tokens_per_step": cfg.batch_size * cfg.seq_len,
        "micro_batch_size": cfg.batch_size // cfg.grad_accum,
        "memory_estimate_bytes": estimate_memory(p),
    }


def git_commit() -> str | None:
    """The commit of the checkout apr runs from, if it runs from one."""
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(apr_cli.__file__).parent), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment() -> dict[str, Any]:
    return {
        "command": sys.argv,
        "apr_version": apr_cli.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "git_commit": git_commit(),
        "host": socket.gethostname(),
    }


class RunReporter:
    """Sends each step to the terminal, the victory log and metrics.jsonl."""

    def __init__(self, run: RunDirectory, emit: Emit, on_progress: Callable[[], None] | None):
        self.run, self.emit, self.on_progress = run, emit, on_progress
        self.losses: list[float] = []

    def on_step(self, metrics: StepMetrics) -> None:
        line = format_step(metrics)
        self.emit(line)
        self.run.log(line)
        self.run.append_metrics(metrics)
        self.losses.append(metrics.loss)
        if self.on_progress is not None:
            self.on_progress()


def warm_up_teacher(p: Prepared, emit: Emit) -> dict[str, Any] | None:
    """Train a preset teacher with CE on the run's batches, then rewind the source."""
    steps = p.teacher_warmup
    if steps == 0:
        return None
    cfg = p.options.train
    warm_cfg = TrainConfig(
        steps=steps,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        grad_accum=cfg.grad_accum,
        lr=cfg.lr,
        warmup=min(cfg.warmup, steps),
        seed=cfg.seed,
    )
    # The teacher is trained in fp32 and frozen afterwards by the distillation pipeline.
    p.teacher.float().train().requires_grad_(True)
    result = Pipeline(p.teacher, None, warm_cfg, p.source, p.backend).train()
    p.teacher.to(p.backend.teacher_dtype)
    p.source.reset()
    emit(
        f"teacher warm-up: {steps} CE steps on the batch source, "
        f"loss {result.initial_loss:.4f} -> {result.final_loss:.4f}"
    )
    return {"steps": steps, "initial_loss": result.initial_loss, "final_loss": result.final_loss}


def execute(
    p: Prepared,
    out: Path,
    *,
    overwrite: bool = False,
    emit: Emit = print,
    on_progress: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train and write the run directory; returns the final manifest."""
    run = RunDirectory.create(out, overwrite=overwrite)
    emit(dataset_line(p.options))
    for w in p.warnings:
        emit(w)
    started = time.perf_counter()
    manifest: dict[str, Any] = {
        "status": "running",
        "started_at": utc_now(),
        **environment(),
        "run_dir": str(run.path.resolve()),
        **plan(p),
        "artifacts": run.artifact_paths(),
    }
    run.write_manifest(manifest)
    for line in (dataset_line(p.options), *p.warnings):
        run.log(line)
    reporter = RunReporter(run, emit, on_progress)
    try:
        manifest["teacher_warmup"] = warm_up_teacher(p, lambda line: (emit(line), run.log(line)))
        header = (
            f"teacher: {p.teacher_info['spec']} ({p.teacher_info['parameters']:,} params) "
            f"student: {p.student_info['spec']} ({p.student_info['parameters']:,} params) "
            f"device: {p.backend.name} ({p.backend.compute_dtype})"
        )
        emit(header)
        run.log(header)
        pipeline = Pipeline(p.student, p.teacher, p.options.train, p.source, p.backend)
        result = pipeline.train(reporter)
        save_model(p.student, run.student_dir)
        write_loss_plot(run.path / "loss.png", reporter.losses)
    except BaseException as e:
        manifest.update(
            status="interrupted" if isinstance(e, KeyboardInterrupt) else "failed",
            error=str(e) or type(e).__name__,
            finished_at=utc_now(),
            wall_time_s=time.perf_counter() - started,
            steps_completed=len(reporter.losses),
        )
        run.write_manifest(manifest)
        raise
    manifest.update(status="completed", finished_at=utc_now(), **summary(result))
    run.write_manifest(manifest)
    final = (
        f"Distillation complete: initial_loss={result.initial_loss:.4f} -> "
        f"final_loss={result.final_loss:.4f} ({result.steps} steps, {result.wall_s:.1f} s)"
    )
    for line in (final, f"Output: {run.path}"):
        emit(line)
        run.log(line)
    return manifest


def summary(result: TrainResult) -> dict[str, Any]:
    return {
        "initial_loss": result.initial_loss,
        "final_loss": result.final_loss,
        "best_loss": result.best_loss,
        "loss_delta": result.final_loss - result.initial_loss,
        "steps": result.steps,
        "tokens": result.tokens,
        "wall_time_s": result.wall_s,
        "sec_per_step": result.sec_per_step,
        "tokens_per_s": result.tokens_per_s,
    }


def plan_json(p: Prepared) -> str:
    return json.dumps(plan(p), indent=2)
