"""Held-out loss: mean next-token cross-entropy and perplexity over fixed windows of a dataset."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apr_cli.data.shards import ShardBatchSource
from apr_cli.distill.backend import Backend, select_backend
from apr_cli.distill.losses import distill_loss
from apr_cli.distill.options import DEFAULT_WINDOWS
from apr_cli.errors import AprError
from apr_cli.model.checkpoint import load_model
from apr_cli.model.qwen2 import Qwen2ForCausalLM


@dataclass(frozen=True)
class Evaluation:
    loss: float  # mean next-token cross-entropy, nats per token
    perplexity: float  # exp(loss)
    windows: int  # windows evaluated
    tokens: int  # labels scored: windows * seq_len
    windows_per_epoch: int  # windows the dataset holds at this seq_len
    seq_len: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def window_indices(n_windows: int, count: int) -> list[int]:
    """`count` of `n_windows` windows spread evenly from window 0; all of them for 0 or more."""
    if count <= 0 or count >= n_windows:
        return list(range(n_windows))
    return [i * n_windows // count for i in range(count)]


def evaluate(
    model: Qwen2ForCausalLM,
    source: ShardBatchSource,
    *,
    seq_len: int,
    windows: int = DEFAULT_WINDOWS,
    batch_size: int = 16,
    backend: Backend | None = None,
) -> Evaluation:
    """Mean CE over every label of the chosen windows (`window_indices`), in batches.

    The same windows for the same dataset, seq_len and count, whatever the batch size.
    """
    if batch_size < 1:
        raise AprError(f"--batch-size must be > 0, got {batch_size}")
    backend = backend or select_backend("cpu")
    picks = window_indices(source.check_seq_len(seq_len), windows)
    total, tokens = 0.0, 0
    model.eval()
    with torch.inference_mode(), backend.autocast():
        for first in range(0, len(picks), batch_size):
            rows = np.stack([source.window(k, seq_len) for k in picks[first : first + batch_size]])
            ids = torch.from_numpy(rows.astype(np.int64)).to(backend.device)  # (B, T+1)
            inputs, labels = ids[:, :-1], ids[:, 1:]
            hidden = model.hidden_states(inputs)  # (B, T, C)
            # The chunked loss: a large vocabulary's (B*T, V) logits never exist at once.
            parts = distill_loss(hidden, model.output_weight, None, None, labels)
            total += float(parts.ce) * labels.numel()
            tokens += labels.numel()
    loss = total / tokens
    return Evaluation(
        loss=loss,
        perplexity=math.exp(loss),
        windows=len(picks),
        tokens=tokens,
        windows_per_epoch=source.windows_per_epoch(seq_len),
        seq_len=seq_len,
    )


def evaluate_model(
    spec: str,
    dataset: Path,
    *,
    seq_len: int,
    windows: int = DEFAULT_WINDOWS,
    batch_size: int = 16,
    device: str = "auto",
) -> dict[str, Any]:
    """Load a model and a dataset (ids checked against the model's vocab) and evaluate."""
    if seq_len < 1:
        raise AprError(f"--seq-len must be > 0, got {seq_len}")
    backend = select_backend(device)
    model, info = load_model(spec, dtype=backend.teacher_dtype, device=backend.device)
    context = model.config.max_position_embeddings
    if seq_len > context:
        raise AprError(f"--seq-len {seq_len} exceeds the model's context of {context}")
    source = ShardBatchSource(dataset, vocab_size=model.config.vocab_size)
    result = evaluate(
        model, source, seq_len=seq_len, windows=windows, batch_size=batch_size, backend=backend
    )
    return {
        "model": info,
        "data": source.describe(),
        "backend": backend.describe(),
        "selection": "evenly spaced" if result.windows < result.windows_per_epoch else "all",
        **result.to_dict(),
    }
