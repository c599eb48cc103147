"""`apr generate`: continue a prompt with a model and print the new tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from apr_cli.commands.common import stderr, user_errors
from apr_cli.commands.options import RUNTIME, flag
from apr_cli.commands.progress import spinner
from apr_cli.errors import AprError

if TYPE_CHECKING:
    import torch

    from apr_cli.data.tokenizer import TextTokenizer
    from apr_cli.model.qwen2 import Qwen2ForCausalLM

PROMPT = "Prompt"
SAMPLING = "Sampling"


def parse_ids(value: str) -> list[int]:
    """Token ids from `5,17,42`."""
    try:
        ids = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise AprError(f"--prompt-ids {value!r}: expected comma-separated integers") from None
    if not ids:
        raise AprError("--prompt-ids: no ids given")
    return ids


def load_model_and_tokenizer(
    model: str, tokenizer: str | None, device: torch.device, seed: int
) -> tuple[Qwen2ForCausalLM, TextTokenizer | None]:
    """The model, and its tokenizer: `tokenizer` or else the model folder's tokenizer.json."""
    from apr_cli.data.tokenizer import load_tokenizer
    from apr_cli.model.checkpoint import load_model

    net, info = load_model(model, device=device, seed=seed)
    if tokenizer is None and info["path"] and (Path(info["path"]) / "tokenizer.json").is_file():
        tokenizer = str(Path(info["path"]) / "tokenizer.json")
    if tokenizer is None:
        return net, None
    tok = load_tokenizer(tokenizer)
    if tok.vocab_size > net.config.vocab_size:
        raise AprError(
            f"--tokenizer {tokenizer}: {tok.vocab_size} tokens, more than the model's "
            f"vocab {net.config.vocab_size}; they were not made for each other"
        )
    return net, tok


def generate(
    model: Annotated[
        str,
        typer.Argument(
            help="A model folder (HF layout), a .gguf file, a preset name, or a cached hub id.",
            metavar="MODEL",
            show_default=False,
        ),
    ],
    prompt_ids: Annotated[
        str | None,
        typer.Option(help="Prompt token ids, comma-separated: 5,17,42.", rich_help_panel=PROMPT),
    ] = None,
    prompt: Annotated[
        str | None,
        typer.Option(help="Prompt text (needs a tokenizer).", rich_help_panel=PROMPT),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="'bytes' or a tokenizer.json; defaults to the model folder's tokenizer.json.",
            rich_help_panel=PROMPT,
        ),
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option(min=0, help="How many tokens to generate.", rich_help_panel=SAMPLING)
    ] = 32,
    temperature: Annotated[
        float,
        typer.Option(min=0.0, help="0 is greedy; above 0 samples.", rich_help_panel=SAMPLING),
    ] = 0.0,
    top_p: Annotated[
        float,
        typer.Option(help="Nucleus sampling mass, in (0, 1].", rich_help_panel=SAMPLING),
    ] = 1.0,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed for sampling and for a preset's weights.", rich_help_panel=SAMPLING
        ),
    ] = 0,
    device: Annotated[
        str,
        typer.Option(
            help="torch device: auto (CUDA when available, else CPU), cpu, cuda, cuda:1.",
            rich_help_panel=RUNTIME,
        ),
    ] = "auto",
    compile_model: Annotated[
        bool,
        flag(
            "--compile",
            help="torch.compile the forward passes (the first call compiles; meant for GPUs).",
            rich_help_panel=RUNTIME,
        ),
    ] = False,
    as_json: Annotated[
        bool, flag("--json", help="Print one JSON object.", rich_help_panel=RUNTIME)
    ] = False,
) -> None:
    """Generate tokens after a prompt and print their ids (and text, with a tokenizer)."""
    import torch

    from apr_cli.distill.backend import resolve_device
    from apr_cli.model.generate import check_request
    from apr_cli.model.generate import generate as generate_tokens

    with user_errors():
        if (prompt_ids is None) == (prompt is None):
            raise AprError("give exactly one of --prompt-ids and --prompt")
        dev = resolve_device(device)
        net, tok = load_model_and_tokenizer(model, tokenizer, dev, seed)
        if prompt is not None:
            if tok is None:
                raise AprError(
                    "--prompt needs --tokenizer (or a tokenizer.json in the model folder)"
                )
            ids = tok.encode(prompt)
            if not ids:
                raise AprError("--prompt: the text encodes to no tokens")
        else:
            ids = parse_ids(prompt_ids)
        gen = torch.Generator(device=dev).manual_seed(seed)
        prompt_tensor = torch.tensor([ids], device=dev)  # (1, T)
        if compile_model:
            # Checked before the start line, so refused input stays one error line.
            check_request(net, prompt_tensor, len(ids), max_new_tokens, temperature, top_p)
            stderr.print("generate: compiling the forward passes (the first calls wait)")
        compiling = "generate: compiling and generating"
        with spinner(stderr, compiling, enabled=compile_model and stderr.is_terminal):
            new = generate_tokens(
                net,
                prompt_tensor,
                max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                generator=gen,
                compile=compile_model,
            )[0].tolist()
        text = tok.decode(new) if tok is not None else None

    if as_json:
        result: dict[str, Any] = {
            "model": model,
            "prompt_ids": ids,
            "new_token_ids": new,
            "text": text,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "device": str(dev),
        }
        typer.echo(json.dumps(result))
        return
    typer.echo("new token ids: " + " ".join(map(str, new)))
    if text is not None:
        typer.echo(f"text: {text}")
