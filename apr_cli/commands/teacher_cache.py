"""`apr teacher-cache build` and `apr teacher-cache inspect`: run the teacher once, reuse it."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from apr_cli.commands.common import stderr, user_errors
from apr_cli.commands.options import DATA, MODELS, OUTPUT, Device
from apr_cli.commands.progress import ProgressBar

app = typer.Typer(
    help="Run a teacher once over a dataset and store its outputs for many distill runs.",
    no_args_is_help=True,
)
stdout = Console(highlight=False, soft_wrap=True)
CACHE = "Cache"


@app.command()
def build(
    teacher: Annotated[
        str,
        typer.Option(
            help="Local HF folder, hub id in the local cache, or preset.", rich_help_panel=MODELS
        ),
    ],
    dataset: Annotated[
        Path,
        typer.Option(
            help="Directory of token shards (*.bin): the one the distill runs will use.",
            exists=True,
            file_okay=False,
            rich_help_panel=DATA,
        ),
    ],
    seq_len: Annotated[
        int,
        typer.Option(help="Tokens per window: the distill runs' --seq-len.", rich_help_panel=DATA),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Cache folder; running the same command again continues an unfinished build.",
            file_okay=False,
            rich_help_panel=OUTPUT,
        ),
    ],
    kind: Annotated[
        str,
        typer.Option(
            help="hidden: exact (the teacher's final hidden states and output weight); "
            "topk: the K largest log-probs, their ids and the tail mass (lossy, smaller).",
            rich_help_panel=CACHE,
        ),
    ] = "hidden",
    top_k: Annotated[int, typer.Option(help="K, for --kind topk.", rich_help_panel=CACHE)] = 32,
    temperature: Annotated[
        float,
        typer.Option(
            help="Softmax temperature of the stored log-probs (--kind topk); distill runs must "
            "use the same --temperature.",
            rich_help_panel=CACHE,
        ),
    ] = 3.0,
    cache_dtype: Annotated[
        str,
        typer.Option(
            help="Storage of the hidden states (--kind hidden): bf16 (half the bytes) or float32 "
            "(a cached run then equals the online one).",
            rich_help_panel=CACHE,
        ),
    ] = "bf16",
    windows: Annotated[
        str | None,
        typer.Option(
            help="A:B caches the dataset's windows A..B-1 at --seq-len [default: all].",
            rich_help_panel=DATA,
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option(help="Windows per teacher forward pass.", rich_help_panel=CACHE)
    ] = 8,
    shard_windows: Annotated[
        int,
        typer.Option(
            help="Windows per shard file (the unit a resumed build redoes); 0: about 64 MiB.",
            rich_help_panel=OUTPUT,
        ),
    ] = 0,
    device: Device = "auto",
) -> None:
    """Build a teacher cache (resumable; under torchrun each rank builds a stripe of shards)."""
    from apr_cli.teacher_cache.build import BuildOptions, build_cache  # torch: not for --help

    options = BuildOptions(
        teacher=teacher,
        dataset=dataset,
        seq_len=seq_len,
        out=out,
        kind=kind,
        top_k=top_k,
        temperature=temperature,
        cache_dtype=cache_dtype,
        windows=windows,
        batch_size=batch_size,
        shard_windows=shard_windows,
        device=device,
    )
    with user_errors(), _progress() as on_shard:
        report = build_cache(options, on_shard)
    _render(report)


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[int, int, int, bool], None]]:
    """A bar on a terminal; elsewhere (logs, pipes) one line per shard on stderr."""
    if not sys.stderr.isatty():

        def line(done: int, total: int, shard: int, skipped: bool) -> None:
            state = "already built" if skipped else "written"
            print(f"shard {shard} {state} ({done}/{total})", file=sys.stderr, flush=True)

        yield line
        return
    with ProgressBar(stderr, "teacher cache") as bar:
        bar.update(0)  # shown from the start: the first shard may take minutes
        yield lambda done, total, shard, skipped: bar.update(done, total)


@app.command()
def inspect(
    cache: Annotated[
        Path,
        typer.Argument(
            help="A teacher cache folder.", exists=True, file_okay=False, show_default=False
        ),
    ],
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="Also hash every shard (reads the whole cache once).",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON report.", rich_help_panel=OUTPUT)
    ] = False,
) -> None:
    """What a cache holds: teacher, dataset, seq_len, windows, kind, bytes/token, size."""
    from apr_cli.teacher_cache.reader import TeacherCache  # torch: not for --help

    with user_errors():
        cached = TeacherCache(cache, verify=False)
        if verify:
            cached.verify()
        report = cached.describe()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _render(report)


def _render(report: dict[str, Any]) -> None:
    teacher, data, layout = report["teacher"], report["dataset"], report["layout"]
    first, end = report["windows"]
    if report["kind"] == "hidden":
        what = f"hidden states ({layout['hidden_size']} x {layout['cache_dtype']}) + output weight"
    else:
        what = f"top-{layout['top_k']} log-probs at T={layout['temperature']} + tail"
    rows = [
        f"cache: {report['path']}",
        f"kind: {report['kind']}: {what}",
        f"teacher: {teacher['spec']} ({teacher['parameters']:,} params, "
        f"vocab {teacher['vocab_size']})",
        f"dataset: {data['path']} ({data['tokens']:,} tokens, {data['windows_per_epoch']:,} "
        f"windows at seq_len {report['seq_len']})",
        f"windows: {first}..{end - 1} ({report['tokens']:,} tokens)",
        f"bytes/token: {report['bytes_per_token']}  size: {report['size_bytes'] / 2**20:.1f} MiB",
        f"shards: {report['shards_done']}/{report['shards']} built"
        + ("" if report["shards_done"] == report["shards"] else " (unfinished: run build again)"),
    ]
    for row in rows:
        stdout.print(escape(row))
