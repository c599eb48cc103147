"""`apr shards build` and `apr shards inspect`: make token shards from text and look inside them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from apr_cli.commands.common import fail, stderr, user_errors
from apr_cli.commands.options import flag
from apr_cli.commands.progress import ProgressBar

if TYPE_CHECKING:
    from apr_cli.data.tokenizer import TextTokenizer

app = typer.Typer(help="Build token shards from text, and inspect them.", no_args_is_help=True)
stdout = Console(highlight=False, soft_wrap=True)

INPUT, TOKENIZER, OUTPUT = "Input", "Tokenizer", "Output"
FILES_SHOWN = 20


@app.command()
def build(
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="Text or code files (one document each), .jsonl files (one document per line), "
            "directories (walked recursively, hidden and binary files skipped) or globs.",
            metavar="INPUT",
            show_default=False,
        ),
    ],
    out: Annotated[
        Path,
        typer.Option(
            help="Output folder: train/ and val/ shards, each with a meta.json.",
            file_okay=False,
            rich_help_panel=OUTPUT,
        ),
    ],
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="'bytes' (built-in byte-level, vocab 257) or a tokenizer.json (or its folder).",
            rich_help_panel=TOKENIZER,
        ),
    ] = None,
    train_bpe: Annotated[
        int | None,
        typer.Option(
            "--train-bpe",
            metavar="VOCAB",
            help="Train a byte-level BPE tokenizer of this vocab size on the training documents "
            "instead of --tokenizer; saved as OUT/tokenizer.json.",
            rich_help_panel=TOKENIZER,
        ),
    ] = None,
    text_field: Annotated[
        str, typer.Option(help="Field holding the text in .jsonl records.", rich_help_panel=INPUT)
    ] = "text",
    val_fraction: Annotated[
        float,
        typer.Option(
            help="Fraction of documents (spread evenly) written to val/ instead of train/.",
            rich_help_panel=OUTPUT,
        ),
    ] = 0.05,
    shard_tokens: Annotated[
        int, typer.Option(help="Tokens per .bin file (4 bytes each).", rich_help_panel=OUTPUT)
    ] = 100_000_000,
    force: Annotated[
        bool,
        flag("--force", help="Replace a non-empty --out folder.", rich_help_panel=OUTPUT),
    ] = False,
) -> None:
    """Tokenize text into uint32 shards, EOS after each document, with a train/val split."""
    from apr_cli.data.build import build_shards, collect_inputs  # torch: only when run

    with user_errors():
        files = collect_inputs(inputs)
        total = sum(f.path.stat().st_size for f in files)
        with ProgressBar(stderr, "tokenizing", total, stderr.is_terminal, in_bytes=True) as bar:
            summary = build_shards(
                inputs,
                files,
                out,
                tokenizer,
                train_bpe_vocab=train_bpe,
                text_field=text_field,
                val_fraction=val_fraction,
                shard_tokens=shard_tokens,
                force=force,
                progress=bar.advance,
            )
    stdout.print(f"wrote {escape(summary['out'])}")
    stdout.print(f"tokenizer: {escape(summary['tokenizer'])} (vocab {summary['vocab_size']})")
    for split, s in summary["splits"].items():
        stdout.print(
            f"{split}: {s['tokens']:,} tokens, {s['documents']:,} documents, {s['files']} files"
        )
    if "val" not in summary["splits"]:
        stdout.print("val: none (too few documents for --val-fraction)")
    if summary["skipped_binary_files"]:
        stdout.print(f"skipped {summary['skipped_binary_files']} binary files")


@app.command()
def inspect(
    path: Annotated[
        Path,
        typer.Argument(
            help="A shard folder, or a `shards build` output holding train/ and val/.",
            metavar="DIR",
            exists=True,
            file_okay=False,
            show_default=False,
        ),
    ],
    vocab_size: Annotated[
        int | None,
        typer.Option(
            help="Check every id is below this (default: the tokenizer's, else meta.json's).",
            rich_help_panel="Checks",
        ),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="'bytes' or a tokenizer.json for the decoded sample (default: meta.json's).",
            rich_help_panel="Checks",
        ),
    ] = None,
    sample: Annotated[
        int, typer.Option(help="Tokens to decode from the start.", rich_help_panel="Output")
    ] = 64,
    as_json: Annotated[
        bool, flag("--json", help="Print a JSON report.", rich_help_panel="Output")
    ] = False,
) -> None:
    """Files, token count, id range, vocab check and a decoded sample; exit 1 if ids are too big."""
    from apr_cli.data.shards import dataset_dirs, inspect_shards  # torch: only when run

    with user_errors():
        reports = []
        for folder in dataset_dirs(path):
            tok = _tokenizer_for(folder, tokenizer)
            vocab = vocab_size if vocab_size is not None else tok.vocab_size if tok else None
            reports.append(inspect_shards(folder, vocab, tok, sample))
    if as_json:
        stdout.print_json(json.dumps(reports if len(reports) > 1 else reports[0]))
    else:
        for report in reports:
            _render(report)
    for report in reports:
        if report["vocab_check"] == "failed":
            raise fail(report["vocab_error"], exit_code=1)


def _tokenizer_for(folder: Path, spec: str | None) -> TextTokenizer | None:
    """The --tokenizer if given, else the one meta.json names (relative to the folder)."""
    from apr_cli.data.shards import read_meta
    from apr_cli.data.tokenizer import load_tokenizer

    if spec is not None:
        return load_tokenizer(spec)
    meta = read_meta(folder) or {}
    return load_tokenizer(meta["tokenizer"], base=folder) if "tokenizer" in meta else None


def _render(report: dict[str, Any]) -> None:
    meta = report["meta"] or {}
    stdout.print(f"[bold]{escape(report['path'])}[/]")
    for f in report["files"][:FILES_SHOWN]:
        stdout.print(f"  {escape(f['name'])}  {f['format']}  {f['tokens']:,} tokens")
    if len(report["files"]) > FILES_SHOWN:
        stdout.print(f"  ... {len(report['files']) - FILES_SHOWN} more files")
    stdout.print(f"files: {len(report['files'])}  tokens: {report['tokens']:,}")
    stdout.print(f"ids: min {report['min_id']}  max {report['max_id']}")
    if "tokenizer" in meta:
        stdout.print(f"tokenizer (meta.json): {escape(str(meta['tokenizer']))}")
    check = report["vocab_check"]
    style = {"ok": "green", "failed": "red"}.get(check, "yellow")
    stdout.print(f"vocab check (< {report['vocab_size']}): [{style}]{check}[/]")
    if "sample" in report:
        stdout.print(f"sample: {escape(repr(report['sample']))}")
