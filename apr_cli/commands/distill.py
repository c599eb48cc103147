"""`apr distill`: parse options, hand them to the library, render progress and the result."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from apr_cli.commands.common import user_errors
from apr_cli.distill import run as run_lib
from apr_cli.distill.losses import LOSS_KINDS
from apr_cli.distill.pipeline import TrainConfig
from apr_cli.distill.run import DEFAULT_STUDENT, DEFAULT_TEACHER, DistillOptions
from apr_cli.distill.rundir import default_run_dir

MODELS, DATA, TRAINING, LOSS, RUN = "Models", "Data", "Training", "Loss", "Run"
DEFAULTS = TrainConfig()


def distill(
    ctx: typer.Context,
    teacher: Annotated[
        str,
        typer.Option(
            help="Teacher: a local Hugging Face folder, a hub id in the local cache, or a preset.",
            rich_help_panel=MODELS,
        ),
    ] = DEFAULT_TEACHER,
    student: Annotated[
        str,
        typer.Option(
            help="Student: a local Hugging Face folder, a hub id in the local cache, or a preset "
            "(freshly initialised from --seed).",
            rich_help_panel=MODELS,
        ),
    ] = DEFAULT_STUDENT,
    student_init: Annotated[
        str | None,
        typer.Option(
            help="Build the student from the teacher instead of --student: "
            "teacher-layers:0,2,4 or teacher-layers:every-other.",
            rich_help_panel=MODELS,
        ),
    ] = None,
    teacher_warmup: Annotated[
        int | None,
        typer.Option(
            help="CE steps that train the teacher on the batches before distilling "
            "[default: 50 for a preset teacher, which starts untrained; 0 otherwise].",
            rich_help_panel=MODELS,
        ),
    ] = None,
    dataset: Annotated[
        Path | None,
        typer.Option(
            help="Directory of token shards (*.bin); without it, synthetic batches.",
            exists=True,
            file_okay=False,
            dir_okay=True,
            rich_help_panel=DATA,
        ),
    ] = None,
    seq_len: Annotated[
        int, typer.Option(help="Tokens per row.", rich_help_panel=DATA)
    ] = DEFAULTS.seq_len,
    batch_size: Annotated[
        int,
        typer.Option(
            help="Rows per optimizer step (split over --grad-accum micro-batches).",
            rich_help_panel=DATA,
        ),
    ] = DEFAULTS.batch_size,
    steps: Annotated[
        int, typer.Option(help="Optimizer steps, exactly.", rich_help_panel=TRAINING)
    ] = DEFAULTS.steps,
    lr: Annotated[
        float, typer.Option(help="Peak learning rate (AdamW).", rich_help_panel=TRAINING)
    ] = DEFAULTS.lr,
    warmup: Annotated[
        int,
        typer.Option(
            help="Linear warm-up steps before cosine decay to lr/10.", rich_help_panel=TRAINING
        ),
    ] = DEFAULTS.warmup,
    grad_accum: Annotated[
        int,
        typer.Option(
            help="Micro-batches per optimizer step (gradient accumulation).",
            rich_help_panel=TRAINING,
        ),
    ] = DEFAULTS.grad_accum,
    grad_clip: Annotated[
        float, typer.Option(help="Max global gradient norm.", rich_help_panel=TRAINING)
    ] = DEFAULTS.grad_clip,
    weight_decay: Annotated[
        float, typer.Option(help="AdamW weight decay.", rich_help_panel=TRAINING)
    ] = DEFAULTS.weight_decay,
    seed: Annotated[
        int, typer.Option(help="Seed for init, data order and sampling.", rich_help_panel=TRAINING)
    ] = DEFAULTS.seed,
    device: Annotated[
        str,
        typer.Option(
            help="auto (CUDA with bf16 when available, else CPU), cuda or cpu.",
            rich_help_panel=TRAINING,
        ),
    ] = "auto",
    loss: Annotated[
        str,
        typer.Option(help=f"KD divergence: {', '.join(LOSS_KINDS)}.", rich_help_panel=LOSS),
    ] = DEFAULTS.loss,
    temperature: Annotated[
        float,
        typer.Option(help="Softmax temperature T of both models.", rich_help_panel=LOSS),
    ] = DEFAULTS.temperature,
    alpha: Annotated[
        float,
        typer.Option(
            help="Weight of the KD term: loss = alpha * T^2 * KD + (1 - alpha) * CE.",
            rich_help_panel=LOSS,
        ),
    ] = DEFAULTS.alpha,
    beta: Annotated[
        float,
        typer.Option(help="JSD mixture weight (--loss jsd), in (0, 1).", rich_help_panel=LOSS),
    ] = DEFAULTS.beta,
    loss_chunk: Annotated[
        int,
        typer.Option(
            help="Tokens per loss block (bounds logits memory); 0 chooses automatically.",
            rich_help_panel=LOSS,
        ),
    ] = DEFAULTS.loss_chunk,
    compile_models: Annotated[
        bool,
        typer.Option(
            "--compile", help="torch.compile the models' forward passes.", rich_help_panel=TRAINING
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run directory [default: runs/distill-YYYYMMDD-HHMMSS, UTC].",
            file_okay=False,
            rich_help_panel=RUN,
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run in this directory from its newest checkpoint; only --steps "
            "(and device or checkpoint settings) may change.",
            exists=True,
            file_okay=False,
            rich_help_panel=RUN,
        ),
    ] = None,
    save_every: Annotated[
        int,
        typer.Option(help="Steps between checkpoints (0: only at the end).", rich_help_panel=RUN),
    ] = DistillOptions.save_every,
    keep_checkpoints: Annotated[
        int, typer.Option(help="Checkpoints kept (the newest).", rich_help_panel=RUN)
    ] = DistillOptions.keep_checkpoints,
    overwrite: Annotated[
        bool,
        typer.Option(help="Replace a run already in --out.", rich_help_panel=RUN),
    ] = False,
    plan_only: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="Print the resolved plan (models, sizes, memory, data) and exit.",
            rich_help_panel=RUN,
        ),
    ] = False,
    json_output: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the final summary (or plan) as JSON on stdout; step lines go to stderr.",
            rich_help_panel=RUN,
        ),
    ] = False,
) -> None:
    """Distill a teacher into a student and leave a run directory with the trained student."""
    train = TrainConfig(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        grad_accum=grad_accum,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        grad_clip=grad_clip,
        temperature=temperature,
        alpha=alpha,
        loss=loss,
        beta=beta,
        seed=seed,
        loss_chunk=loss_chunk,
        compile=compile_models,
    )
    options = DistillOptions(
        teacher=teacher,
        student=student,
        student_init=student_init,
        dataset=dataset,
        device=device,
        teacher_warmup=teacher_warmup,
        save_every=save_every,
        keep_checkpoints=keep_checkpoints,
        train=train,
    )
    lines = Console(file=sys.stderr if json_output else sys.stdout, highlight=False, soft_wrap=True)

    def emit(line: str) -> None:
        lines.print(line, markup=False)

    with user_errors():
        if resume is not None:
            prepared, run, manifest, state = run_lib.resume(
                resume, explicit_options(ctx, options), emit=emit
            )
        else:
            prepared = run_lib.prepare(options)
            if plan_only:
                render_plan(prepared, json_output, lines)
                return
            run, manifest = run_lib.start(
                prepared, out or default_run_dir(), overwrite=overwrite, emit=emit
            )
            state = None
        for_terminal = lines.is_terminal and not json_output
        with ProgressBar(lines, prepared.options.train.steps, for_terminal) as advance:
            manifest = run_lib.train_run(
                prepared, run, manifest, state=state, emit=emit, on_progress=advance
            )
    if json_output:
        typer.echo(json.dumps(manifest, indent=2))


# CLI parameters that are not run options, and the one whose name differs.
NOT_OPTIONS = {"ctx", "resume", "out", "overwrite", "plan_only", "json_output"}
RENAMED = {"compile_models": "compile"}


def explicit_options(ctx: typer.Context, options: DistillOptions) -> dict:
    """The options the user typed (not defaults): what a resume is asked to change."""
    values = {**options.to_dict(), **options.train.to_dict()}
    typed = [
        RENAMED.get(param.name, param.name)
        for param in ctx.command.params
        if param.name not in NOT_OPTIONS
        and getattr(ctx.get_parameter_source(param.name), "name", None) == "COMMANDLINE"
    ]
    return {name: values[name] for name in typed}


def render_plan(prepared, json_output: bool, lines: Console) -> None:
    info = run_lib.plan(prepared)
    if json_output:
        typer.echo(json.dumps(info, indent=2))
        return
    mem = info["memory_estimate_bytes"]
    hp = info["hyperparameters"]
    rows = [
        describe_model("teacher", info["teacher"]),
        describe_model("student", info["student"]),
        f"teacher warm-up: {info['teacher_warmup_steps']} steps",
        f"data: {json.dumps(info['data'])}",
        f"shared vocab: {info['shared_vocab_size']}",
        f"device: {info['backend']['device']} ({info['backend']['dtype']})",
        f"steps: {hp['steps']}, batch {hp['batch_size']} x seq {hp['seq_len']} = "
        f"{info['tokens_per_step']:,} tokens/step, micro-batch {info['micro_batch_size']}",
        f"loss: {hp['loss']}, T={hp['temperature']}, alpha={hp['alpha']} (KD weight)",
        f"memory estimate: {mem['total'] / 2**20:,.1f} MiB "
        f"(teacher {mem['teacher_weights'] / 2**20:,.1f}, student+optimizer "
        f"{mem['student_weights_grads_optimizer'] / 2**20:,.1f}, activations "
        f"{mem['activations'] / 2**20:,.1f}, logits {mem['logits'] / 2**20:,.1f})",
    ]
    for row in rows:
        lines.print(row, markup=False)


def describe_model(role: str, info: dict | None) -> str:
    if info is None:
        return f"{role}: none"
    return (
        f"{role}: {info['spec']} ({info['kind']}, {info['parameters']:,} params, {info['dtype']})"
    )


class ProgressBar:
    """A rich progress bar on a terminal; nothing elsewhere. Yields the advance callback."""

    def __init__(self, console: Console, total: int, enabled: bool):
        self.progress = (
            Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=console,
                transient=True,
            )
            if enabled
            else None
        )
        self.total = total

    def __enter__(self):
        if self.progress is None:
            return None
        self.progress.start()
        task = self.progress.add_task("distill", total=self.total)
        return lambda: self.progress.advance(task)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
