"""One distillation run end to end: resolve models and data, train, and leave a run directory."""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from signal import SIGINT, SIGTERM
from typing import Any

import torch

import apr_cli
from apr_cli.data.shards import ShardBatchSource
from apr_cli.data.source import BatchSource, SyntheticBatchSource
from apr_cli.distill.backend import Backend, seed_everything, select_backend
from apr_cli.distill.checkpoints import load_latest_checkpoint, save_checkpoint
from apr_cli.distill.config_file import CONFIG_FILE, flat_values, write_config
from apr_cli.distill.evaluate import DEFAULT_WINDOWS
from apr_cli.distill.losses import auto_chunk_tokens
from apr_cli.distill.parallel import any_rank
from apr_cli.distill.pipeline import Pipeline, StepMetrics, TrainConfig, TrainResult
from apr_cli.distill.plot import write_loss_plot
from apr_cli.distill.rundir import LOSS_PLOT, RunDirectory, format_step, utc_now
from apr_cli.distill.sinks import JSONL, check_installed, parse_report_to
from apr_cli.distill.watch import RunWatch
from apr_cli.errors import AprError
from apr_cli.model.checkpoint import (
    init_student_from_teacher,
    load_model,
    parse_teacher_layers,
    save_model,
)
from apr_cli.model.config import ModelConfig
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

    teacher: str | None = DEFAULT_TEACHER  # None trains the student on the labels alone
    student: str = DEFAULT_STUDENT
    student_init: str | None = None  # teacher-layers:0,2,... builds the student from the teacher
    dataset: Path | None = None
    shuffle: bool = False  # read --dataset windows in a seeded random order per epoch
    device: str = "auto"
    teacher_warmup: int | None = None  # None: PRESET_TEACHER_WARMUP for a preset teacher, else 0
    save_every: int = 1000  # steps between checkpoints (one is always written at the end)
    fsdp: bool = False  # under torchrun: shard student and teacher (FSDP2) instead of DDP
    keep_checkpoints: int = 2
    val_dataset: Path | None = None  # held-out shards scored during training
    eval_every: int = 0  # steps between evals; 0: after the last step only
    eval_windows: int = DEFAULT_WINDOWS  # val windows scored, the same each time; 0: all
    keep_best: bool = False  # keep the student with the lowest val loss
    report_to: str = JSONL  # comma-separated sinks; metrics.jsonl is always written
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("dataset", "val_dataset"):
            d[name] = None if d[name] is None else str(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DistillOptions:
        fields = {**d, "train": TrainConfig(**d["train"])}
        for name in ("dataset", "val_dataset"):
            fields[name] = None if d.get(name) is None else Path(d[name])
        return cls(**fields)

    def validate(self) -> None:
        self.train.validate()
        if self.teacher_warmup is not None and self.teacher_warmup < 0:
            raise AprError(f"--teacher-warmup must be >= 0, got {self.teacher_warmup}")
        if self.save_every < 0:
            raise AprError(f"--save-every must be >= 0, got {self.save_every}")
        if self.keep_checkpoints < 1:
            raise AprError(f"--keep-checkpoints must be >= 1, got {self.keep_checkpoints}")
        if self.eval_every < 0:
            raise AprError(f"--eval-every must be >= 0, got {self.eval_every}")
        if self.eval_windows < 0:
            raise AprError(f"--eval-windows must be >= 0, got {self.eval_windows}")
        if self.val_dataset is None and (self.eval_every or self.keep_best):
            flag = "--eval-every" if self.eval_every else "--keep-best"
            raise AprError(f"{flag} needs --val-dataset")
        parse_report_to(self.report_to)


@dataclass
class Prepared:
    """Models, data and backend resolved and checked; nothing written yet."""

    options: DistillOptions
    backend: Backend
    teacher: Qwen2ForCausalLM | None
    student: Qwen2ForCausalLM
    teacher_info: dict[str, Any] | None
    student_info: dict[str, Any]
    source: BatchSource
    vocab_size: int  # rows both models share; data ids must stay below it
    warnings: list[str]
    val_source: ShardBatchSource | None = None  # --val-dataset

    @property
    def teacher_warmup(self) -> int:
        if self.teacher_info is None:
            return 0
        if self.options.teacher_warmup is not None:
            return self.options.teacher_warmup
        return PRESET_TEACHER_WARMUP if self.teacher_info["kind"] == "preset" else 0

    @property
    def verb(self) -> str:
        """What the run does, for its summary line."""
        return "Training" if self.teacher is None else "Distillation"


def prepare(options: DistillOptions) -> Prepared:
    """Resolve and check everything a run needs, failing before any file is written."""
    options.validate()
    cfg = options.train
    backend = select_backend(options.device)
    seed_everything(cfg.seed)
    teacher, teacher_info = None, None
    if options.teacher is not None:
        teacher, teacher_info = load_model(
            options.teacher, dtype=backend.teacher_dtype, device=backend.device, seed=cfg.seed + 1
        )
    if options.student_init is not None:
        if teacher is None:
            raise AprError("--student-init needs a --teacher to take layers from")
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
    models = [m for m in (teacher, student) if m is not None]
    vocab = (
        shared_vocab_size(teacher.config.vocab_size, student.config.vocab_size)
        if teacher is not None
        else student.config.vocab_size
    )
    context = min(m.config.max_position_embeddings for m in models)
    cfg.validate(max_seq_len=context)
    if cfg.batch_size % (cfg.grad_accum * backend.world_size):
        raise AprError(
            f"--batch-size {cfg.batch_size} is not a multiple of --grad-accum {cfg.grad_accum} "
            f"x world size {backend.world_size}"
        )
    if options.dataset is not None:
        source: BatchSource = ShardBatchSource(
            options.dataset,
            vocab_size=vocab,
            rank=backend.rank,
            world_size=backend.world_size,
            shuffle=options.shuffle,
            seed=cfg.seed,
        )
        source.check_seq_len(cfg.seq_len)
    else:
        source = SyntheticBatchSource(vocab, rank=backend.rank, world_size=backend.world_size)
    val_source = None
    if options.val_dataset is not None:
        val_source = ShardBatchSource(options.val_dataset, vocab_size=vocab)
        val_source.check_seq_len(cfg.seq_len)
    check_installed(parse_report_to(options.report_to))
    warnings = []
    if teacher is not None and same_model(teacher, student, teacher_info, student_info):
        warnings.append(
            "warning: teacher and student are the same model: there is nothing to distill"
        )
    return Prepared(
        options,
        backend,
        teacher,
        student,
        teacher_info,
        student_info,
        source,
        vocab,
        warnings,
        val_source,
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
    cfg, s = p.options.train, p.student.config
    vocab = max(m.config.vocab_size for m in (p.teacher, p.student) if m is not None)
    tokens = cfg.batch_size // (cfg.grad_accum * p.backend.world_size) * cfg.seq_len  # per pass
    act_bytes = 2 if p.backend.autocast_dtype is not None else 4
    teacher_weights = count_parameters(p.teacher) * act_bytes if p.teacher is not None else 0
    student_states = count_parameters(p.student) * 16  # weights, grads, two moments, fp32
    # ~16 saved tensors of width hidden per layer and token, for backward.
    activations = tokens * s.hidden_size * s.num_hidden_layers * 16 * act_bytes
    # The chunked loss holds about nine (block, vocab) fp32 tensors, never the full logits.
    block = min(cfg.loss_chunk or auto_chunk_tokens(vocab), tokens)
    logits = block * vocab * 4 * 9
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


# Settings a resumed run may change: they do not change what the student learns.
RESUMABLE_CHANGES = {
    "steps",
    "device",
    "save_every",
    "keep_checkpoints",
    "loss_chunk",
    "compile",
    "fsdp",
    "report_to",
}
TEACHER_WARMED = "teacher-warmed.apr"


class RunInterrupted(AprError):
    def __init__(self, signum: int, run_dir: Path, step: int, command: str):
        name = signal.Signals(signum).name
        super().__init__(
            f"interrupted by {name} after step {step}; checkpoint saved; "
            f"continue with: apr {command} --resume {run_dir}",
            exit_code=128 + signum,
        )


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second one exits at once."""

    def __init__(self):
        self.signum: int | None = None

    def requested(self) -> bool:
        return self.signum is not None

    def handle(self, signum, frame) -> None:
        if self.signum is not None:
            # Every file is replaced atomically, so leaving mid-write corrupts nothing.
            os._exit(128 + signum)
        self.signum = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be set from the main thread
            return
        previous = {sig: signal.signal(sig, self.handle) for sig in (SIGINT, SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class RunReporter:
    """Sends each step to the terminal, victory log, metrics.jsonl and watch; checkpoints."""

    def __init__(
        self,
        run: RunDirectory,
        pipeline: Pipeline,
        options: DistillOptions,
        emit: Emit,
        on_progress: Callable[[], None] | None,
        watch: RunWatch,
    ):
        self.run, self.pipeline, self.options = run, pipeline, options
        self.emit, self.on_progress, self.watch = emit, on_progress, watch

    def on_step(self, metrics: StepMetrics) -> None:
        line = format_step(metrics)
        self.emit(line)
        self.run.log(line)
        self.run.append_metrics(metrics)
        eval_line = self.watch.on_step(metrics, self.pipeline)
        if eval_line is not None:
            self.emit(eval_line)
            self.run.log(eval_line)
        every = self.options.save_every
        if every and metrics.step % every == 0 and metrics.step < metrics.steps:
            self.checkpoint()
        if self.on_progress is not None:
            self.on_progress()

    def checkpoint(self) -> None:
        """Save the pipeline and how far the logs had got, so a resume can cut them back.

        Every rank takes part in gathering the state; rank 0 writes it.
        """
        state = {
            "pipeline": self.pipeline.state_dict(),
            "log_bytes": self.run.log_size(),
            "options": self.options.to_dict(),
            "validation": self.watch.state_dict(),
        }
        if self.run.writable:
            save_checkpoint(self.run.path, self.pipeline.step, state, self.options.keep_checkpoints)


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


def start(
    p: Prepared, out: Path, *, overwrite: bool = False, emit: Emit = print
) -> tuple[RunDirectory, dict[str, Any]]:
    """Create the run directory and its manifest, and warm up a preset teacher."""
    run = RunDirectory.create(out, overwrite=overwrite, writable=p.backend.is_main)
    emit = main_only(emit, p)
    manifest: dict[str, Any] = {
        "status": "running",
        "started_at": utc_now(),
        **environment(),
        "run_dir": str(run.path.resolve()),
        "options": p.options.to_dict(),
        **plan(p),
        "artifacts": run.artifact_paths(),
    }
    run.write_manifest(manifest)
    if run.writable:
        write_config(run.path / CONFIG_FILE, p.options)

    def emit_and_log(line: str) -> None:
        emit(line)
        run.log(line)

    for line in (dataset_line(p.options), *p.warnings):
        emit_and_log(line)
    try:
        manifest["teacher_warmup"] = warm_up_teacher(p, emit_and_log)
        if manifest["teacher_warmup"] is not None and run.writable:
            # A resumed run must distill from this same teacher, not warm up a new one.
            save_model(p.teacher, run.path / TEACHER_WARMED)
    except BaseException as e:
        finish_failed(run, manifest, e, steps_completed=0)
        raise
    teacher = (
        f"{p.teacher_info['spec']} ({p.teacher_info['parameters']:,} params)"
        if p.teacher_info is not None
        else "none (cross-entropy on the labels only)"
    )
    emit_and_log(
        f"teacher: {teacher} "
        f"student: {p.student_info['spec']} ({p.student_info['parameters']:,} params) "
        f"device: {p.backend.name} ({p.backend.compute_dtype})"
    )
    return run, manifest


def resume(
    run_dir: Path, overrides: dict[str, Any], *, emit: Emit = print
) -> tuple[Prepared, RunDirectory, dict[str, Any], dict[str, Any]]:
    """Reopen a run at its newest checkpoint; refuse changes that would alter the result."""
    run = RunDirectory(run_dir)
    manifest = run.read_manifest()
    if manifest is None or "options" not in manifest:
        raise AprError(f"--resume {run_dir}: not a run directory (no readable dispatch.json)")
    path, checkpoint = load_latest_checkpoint(run.path)
    saved = DistillOptions.from_dict(checkpoint["options"])
    options = apply_overrides(saved, overrides)
    changed = [
        f"--{name.replace('_', '-')} {new!r} (the run used {old!r})"
        for name, (old, new) in differences(saved, options).items()
        if name not in RESUMABLE_CHANGES
    ]
    if changed:
        raise AprError(
            f"--resume {run_dir}: {'; '.join(changed)} would change the result; "
            "start a new run instead"
        )
    step = checkpoint["pipeline"]["step"]
    if options.train.steps < step:
        raise AprError(f"--steps {options.train.steps} is below the checkpoint's step {step}")
    warmed = run.path / TEACHER_WARMED
    load = replace(options, teacher=str(warmed), teacher_warmup=0) if warmed.is_dir() else options
    p = prepare(load)
    p.options = options
    run.writable = p.backend.is_main
    emit = main_only(emit, p)
    run.truncate_logs(checkpoint["log_bytes"], step)
    manifest.update(
        status="running",
        options=options.to_dict(),
        hyperparameters=options.train.to_dict(),
        backend=p.backend.describe(),
    )
    manifest.setdefault("resumed", []).append(
        {"from_step": step, "checkpoint": str(path), "at": utc_now(), "command": sys.argv}
    )
    for key in ("error", "finished_at"):
        manifest.pop(key, None)
    run.write_manifest(manifest)
    if run.writable:
        write_config(run.path / CONFIG_FILE, options)
    for line in (dataset_line(options), f"resumed from {path.name} (step {step})"):
        emit(line)
        run.log(line)
    return p, run, manifest, checkpoint


def apply_overrides(options: DistillOptions, overrides: dict[str, Any]) -> DistillOptions:
    """`options` with explicitly given settings replaced (train settings by their own names)."""
    train_fields = set(options.train.to_dict())
    train = replace(options.train, **{k: v for k, v in overrides.items() if k in train_fields})
    top = {k: v for k, v in overrides.items() if k not in train_fields}
    return replace(options, train=train, **top)


def differences(a: DistillOptions, b: DistillOptions) -> dict[str, tuple[Any, Any]]:
    flat_a = {**a.to_dict(), **a.train.to_dict()}
    flat_b = {**b.to_dict(), **b.train.to_dict()}
    return {k: (flat_a[k], flat_b[k]) for k in flat_a if k != "train" and flat_a[k] != flat_b[k]}


def train_run(
    p: Prepared,
    run: RunDirectory,
    manifest: dict[str, Any],
    *,
    state: dict[str, Any] | None = None,
    emit: Emit = print,
    on_progress: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train to the last step (from checkpoint `state` on resume), save, finalize the manifest."""
    emit = main_only(emit, p)
    cfg = p.options.train
    watch = RunWatch.open(
        run,
        val_source=p.val_source,
        eval_every=p.options.eval_every,
        eval_windows=p.options.eval_windows,
        seq_len=cfg.seq_len,
        micro_batch=cfg.batch_size // (cfg.grad_accum * p.backend.world_size),
        backend=p.backend,
        keep_best=p.options.keep_best,
        report_to=parse_report_to(p.options.report_to),
        config=flat_values(p.options),
        started_at=manifest["started_at"],
        resumed_at=None if state is None else state["pipeline"]["step"],
        save_student=save_student,
    )
    pipeline = Pipeline(
        p.student,
        p.teacher,
        p.options.train,
        p.source,
        p.backend,
        parallel="fsdp" if p.options.fsdp else "ddp",
    )
    if state is not None:
        pipeline.load_state_dict(state["pipeline"])
        watch.load_state_dict(state.get("validation"))
    reporter = RunReporter(run, pipeline, p.options, emit, on_progress, watch)
    stop = StopSignals()
    try:
        with stop.installed():
            result = pipeline.train(
                reporter, should_stop=lambda: any_rank(stop.requested(), p.backend)
            )
            reporter.checkpoint()
            if stop.signum is not None:
                command = "train" if p.teacher is None else "distill"
                raise RunInterrupted(stop.signum, run.path, pipeline.step, command)
        save_student(pipeline, run.student_dir)
        if run.writable:
            write_loss_plot(run.path / LOSS_PLOT, pipeline.losses)
    except BaseException as e:
        if pipeline.losses and run.writable:
            manifest.update(summary(pipeline.result()), **watch.summary())
            write_loss_plot(run.path / LOSS_PLOT, pipeline.losses)
        finish_failed(run, manifest, e, steps_completed=pipeline.step)
        raise
    finally:
        watch.close()
    manifest.update(status="completed", finished_at=utc_now(), **summary(result), **watch.summary())
    run.write_manifest(manifest)
    final = (
        f"{p.verb} complete: initial_loss={result.initial_loss:.4f} -> "
        f"final_loss={result.final_loss:.4f} ({result.steps} steps, {result.wall_s:.1f} s)"
    )
    for line in (final, f"Output: {run.path}"):
        emit(line)
        run.log(line)
    return manifest


def main_only(emit: Emit, p: Prepared) -> Emit:
    """Rank 0 speaks for the run; other ranks print nothing."""
    return emit if p.backend.is_main else (lambda line: None)


def save_student(pipeline: Pipeline, path: Path) -> None:
    """Save the student as a model folder (collective: every rank calls; rank 0 writes)."""
    weights = pipeline.student_state()  # gathers shards under FSDP2
    if pipeline.backend.is_main:
        save_model(model_from_state(pipeline.student.config, weights), path)


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor]) -> Qwen2ForCausalLM:
    """A plain model holding `state`, without a second initialisation of the weights."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model.load_state_dict(state, assign=True)
    return model


def finish_failed(
    run: RunDirectory, manifest: dict[str, Any], error: BaseException, steps_completed: int
) -> None:
    """Record why a run stopped early: interrupted by a signal, or failed."""
    interrupted = isinstance(error, (RunInterrupted, KeyboardInterrupt))
    manifest.update(
        status="interrupted" if interrupted else "failed",
        error=str(error) or type(error).__name__,
        finished_at=utc_now(),
        steps_completed=steps_completed,
    )
    run.write_manifest(manifest)
    run.log(f"{manifest['status']}: {manifest['error']}")


def execute(
    p: Prepared,
    out: Path,
    *,
    overwrite: bool = False,
    emit: Emit = print,
    on_progress: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """A new run: create the run directory, train, save; returns the final manifest."""
    run, manifest = start(p, out, overwrite=overwrite, emit=emit)
    return train_run(p, run, manifest, emit=emit, on_progress=on_progress)


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
