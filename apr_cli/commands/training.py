"""The body `apr distill` and `apr train` share: options -> plan or run (or resume) -> render."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

from apr_cli.commands.common import user_errors
from apr_cli.distill import run as run_lib
from apr_cli.distill.run import DistillOptions, Prepared
from apr_cli.distill.rundir import default_run_dir

# Command parameters that are not run options, and those named differently in DistillOptions
# or TrainConfig.
NOT_OPTIONS = {"resume", "out", "overwrite", "plan_only", "json_output", "config"}
RENAMED: dict[str, str] = {}


def option_values(ctx: typer.Context, *, typed_only: bool = False) -> dict[str, Any]:
    """The command's run options by their library names; `typed_only`: those on the command line.

    What was typed (not defaulted) is what a resume is asked to change.
    """
    names = [n for n in ctx.params if n not in NOT_OPTIONS and (not typed_only or typed(ctx, n))]
    return {RENAMED.get(n, n): ctx.params[n] for n in names}


def typed(ctx: typer.Context, name: str) -> bool:
    """Whether the parameter was given on the command line (not a default)."""
    return getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"


def run_training(ctx: typer.Context, base: DistillOptions, name: str) -> None:
    """Run the command in `ctx`: `base` with the parsed options applied, in runs/NAME-... .

    The command's parameters are read from `ctx.params`, so a command is its option list.
    """
    flags = ctx.params
    options = run_lib.apply_overrides(base, option_values(ctx))
    json_output = flags["json_output"]
    lines = Console(file=sys.stderr if json_output else sys.stdout, highlight=False, soft_wrap=True)

    def emit(line: str) -> None:
        lines.print(line, markup=False)

    with user_errors():
        if flags["resume"] is not None:
            prepared, run, manifest, state = run_lib.resume(
                flags["resume"], option_values(ctx, typed_only=True), emit=emit
            )
        else:
            prepared = run_lib.prepare(options)
            if flags["plan_only"]:
                render_plan(prepared, json_output, lines)
                return
            out = flags["out"] or default_run_dir(name)
            run, manifest = run_lib.start(prepared, out, overwrite=flags["overwrite"], emit=emit)
            state = None
        for_terminal = lines.is_terminal and not json_output
        with ProgressBar(lines, prepared.options.train.steps, for_terminal, name) as advance:
            manifest = run_lib.train_run(
                prepared, run, manifest, state=state, emit=emit, on_progress=advance
            )
    if json_output:
        typer.echo(json.dumps(manifest, indent=2))


def render_plan(prepared: Prepared, json_output: bool, lines: Console) -> None:
    info = run_lib.plan(prepared)
    if json_output:
        typer.echo(json.dumps(info, indent=2))
        return
    mem = info["memory_estimate_bytes"]
    hp = info["hyperparameters"]
    loss = (
        f"loss: {hp['loss']}, T={hp['temperature']}, alpha={hp['alpha']} (KD weight)"
        if info["teacher"] is not None
        else "loss: cross-entropy on the labels (no teacher)"
    )
    rows = [
        describe_model("teacher", info["teacher"]),
        describe_model("student", info["student"]),
        f"teacher warm-up: {info['teacher_warmup_steps']} steps",
        f"data: {json.dumps(info['data'])}",
        f"shared vocab: {info['shared_vocab_size']}",
        f"device: {info['backend']['device']} ({info['backend']['dtype']})",
        f"steps: {hp['steps']}, batch {hp['batch_size']} x seq {hp['seq_len']} = "
        f"{info['tokens_per_step']:,} tokens/step, micro-batch {info['micro_batch_size']}",
        loss,
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

    def __init__(self, console: Console, total: int, enabled: bool, description: str):
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
        self.total, self.description = total, description

    def __enter__(self):
        if self.progress is None:
            return None
        self.progress.start()
        task = self.progress.add_task(self.description, total=self.total)
        return lambda: self.progress.advance(task)

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
