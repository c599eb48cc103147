"""The body `apr distill` and `apr train` share: options -> plan or run (or resume) -> render."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.text import Text

from apr_cli.commands.common import user_errors
from apr_cli.commands.progress import ProgressBar
from apr_cli.distill.options import DistillOptions


@dataclass(frozen=True)
class RunFlags:
    """The flags that say where and how a command runs, rather than what it trains."""

    out: Path | None  # None: runs/COMMAND-YYYYMMDD-HHMMSS
    resume: Path | None
    overwrite: bool
    plan_only: bool
    json_output: bool


def run_training(
    options: DistillOptions, defaults: DistillOptions, flags: RunFlags, name: str
) -> None:
    """Plan, run or resume `options` for command `name`, and render what happened.

    On --resume, `defaults` (the command's options with no flags given) tells which settings
    the command line asked to change.
    """
    # torch and the run machinery load only when a command runs, so `--help` stays fast.
    from apr_cli.distill import run as run_lib
    from apr_cli.distill.prepare import plan, prepare
    from apr_cli.distill.rundir import default_run_dir

    lines = Console(
        file=sys.stderr if flags.json_output else sys.stdout, highlight=False, soft_wrap=True
    )
    emit = line_printer(lines)
    # Bars only on a terminal; elsewhere the step lines (and warm-up lines) show progress.
    for_terminal = lines.is_terminal and not flags.json_output

    with user_errors():
        if flags.resume is not None:
            prepared, run, manifest, state = run_lib.resume(
                flags.resume, options, defaults, emit=emit
            )
        else:
            prepared = prepare(options, plan_only=flags.plan_only)
            if flags.plan_only:
                if prepared.backend.is_main:  # under torchrun, one plan, not one per rank
                    render_plan(plan(prepared), flags.json_output, lines)
                return
            out = flags.out or default_run_dir(name, claim=prepared.backend.is_main)
            with ProgressBar(lines, "teacher warm-up", enabled=for_terminal) as warmup:
                run, manifest = run_lib.start(
                    prepared, out, overwrite=flags.overwrite, emit=emit, on_warmup=warmup.update
                )
            state = None
        with ProgressBar(lines, name, prepared.options.train.steps, for_terminal) as bar:
            manifest = run_lib.train_run(
                prepared, run, manifest, state=state, emit=emit, on_progress=bar.update
            )
    if flags.json_output:
        typer.echo(json.dumps(manifest, indent=2))


def line_printer(console: Console) -> Callable[[str], None]:
    """Print lines as plain text.

    Not `print(markup=False)`: a live progress bar is redrawn with the options of the print
    call, and without markup its style tags show up literally.
    """
    return lambda line: console.print(Text(line))


def render_plan(info: dict[str, Any], json_output: bool, lines: Console) -> None:
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
        f"data: {describe_data(info['data'])}",
        f"shared vocab: {info['shared_vocab_size']}, loss vocab: {info['loss_vocab_size']}",
        f"device: {info['backend']['device']} ({info['backend']['dtype']})",
        f"steps: {hp['steps']}, batch {hp['batch_size']} x seq {hp['seq_len']} = "
        f"{info['tokens_per_step']:,} tokens/step, micro-batch {info['micro_batch_size']}",
        loss,
        f"memory estimate: {mem['total'] / 2**20:,.1f} MiB "
        f"(teacher {mem['teacher_weights'] / 2**20:,.1f}, student+optimizer "
        f"{mem['student_weights_grads_optimizer'] / 2**20:,.1f}, activations "
        f"{mem['activations'] / 2**20:,.1f}, logits {mem['logits'] / 2**20:,.1f}, "
        f"sampling KV cache {mem['sampling_kv_cache'] / 2**20:,.1f})",
    ]
    o = info["on_policy"]
    if o is not None:
        rows.insert(
            -1,
            f"on-policy: {o['on_policy_fraction']:g} of steps sample {o['max_new_tokens']} "
            "tokens from the "
            f"{'teacher' if o['teacher_samples'] else 'student'} "
            f"(T={o['sample_temperature']:g}, top-p={o['sample_top_p']:g}) after prompts "
            f"{json.dumps(o['prompt_source'])}",
        )
    for row in rows:
        lines.print(row, markup=False)


def describe_data(data: dict[str, Any]) -> str:
    """One readable line for the plan: where the tokens come from and their vocabulary."""
    if data["kind"] == "synthetic":
        return f"synthetic batches (row i repeats token i % {data['vocab_size']})"
    vocab = data["vocab_size"] if data["vocab_size"] is not None else "unknown (no meta.json)"
    tokenizer = f", tokenizer {data['tokenizer']}" if "tokenizer" in data else ""
    order = "shuffled" if data["shuffle"] else "in order"
    return (
        f"{data['path']}: {data['tokens']:,} tokens in {data['files']} files{tokenizer}, "
        f"dataset vocab {vocab}, windows read {order}"
    )


def describe_model(role: str, info: dict | None) -> str:
    if info is None:
        return f"{role}: none"
    return (
        f"{role}: {info['spec']} ({info['kind']}, {info['parameters']:,} params, {info['dtype']})"
    )
