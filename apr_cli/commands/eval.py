"""`apr eval`: a model's mean next-token loss and perplexity on fixed windows of a dataset."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from apr_cli.commands.common import stderr, user_errors
from apr_cli.commands.options import DATA, DEVICE_HELP, OUTPUT, RUNTIME, SeqLen, flag
from apr_cli.commands.progress import ProgressBar
from apr_cli.distill.options import DEFAULT_WINDOWS, TrainConfig

stdout = Console(highlight=False, soft_wrap=True)


def eval_model(
    model: Annotated[
        str,
        typer.Argument(
            help="A local Hugging Face folder (e.g. RUN/student-trained.apr), a .gguf file, a "
            "hub id in the local cache, or a preset.",
            metavar="MODEL",
            show_default=False,
        ),
    ],
    dataset: Annotated[
        Path,
        typer.Option(
            help="Directory of token shards (*.bin), e.g. a build's val/ folder.",
            exists=True,
            file_okay=False,
            rich_help_panel=DATA,
        ),
    ],
    windows: Annotated[
        int,
        typer.Option(
            help="Windows scored, spread evenly over the dataset from window 0 (0: every window).",
            rich_help_panel=DATA,
        ),
    ] = DEFAULT_WINDOWS,
    seq_len: SeqLen = TrainConfig.seq_len,
    batch_size: Annotated[
        int, typer.Option(help="Windows per forward pass.", rich_help_panel=DATA)
    ] = 16,
    device: Annotated[str, typer.Option(help=DEVICE_HELP, rich_help_panel=RUNTIME)] = "auto",
    json_output: Annotated[
        bool, flag("--json", help="Print the report as JSON.", rich_help_panel=OUTPUT)
    ] = False,
) -> None:
    """Mean next-token loss (nats per token) and perplexity over fixed, deterministic windows."""
    from apr_cli.distill.evaluate import evaluate_model  # torch: only when the command runs

    bar = ProgressBar(stderr, "eval", enabled=stderr.is_terminal)

    def progress(done: int, total: int) -> None:
        if done == 0:  # checked and about to start; on stderr, as stdout may be JSON
            start = f"eval: scoring {total:,} windows of {seq_len} tokens of {dataset} with {model}"
            stderr.print(Text(start))
        bar.update(done, total)

    with user_errors(), bar:
        report = evaluate_model(
            model,
            dataset,
            seq_len=seq_len,
            windows=windows,
            batch_size=batch_size,
            device=device,
            on_progress=progress,
        )
    if json_output:
        typer.echo(json.dumps(report, indent=2))
        return
    info = report["model"]
    rows = [
        f"model: {info['spec']} ({info['parameters']:,} params, {info['dtype']})",
        f"dataset: {report['data']['path']} ({report['data']['tokens']:,} tokens, "
        f"{report['windows_per_epoch']:,} windows at seq_len {report['seq_len']})",
        f"windows: {report['windows']:,} ({report['selection']}), {report['tokens']:,} tokens",
        f"loss: {report['loss']:.4f}  perplexity: {report['perplexity']:.2f}",
    ]
    for row in rows:
        stdout.print(escape(row))
