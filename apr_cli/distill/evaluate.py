"""Held-out loss: mean next-token cross-entropy and perplexity over fixed windows of a dataset."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from apr_cli.data.shards import ShardBatchSource
from apr_cli.distill.backend import Backend, select_backend
from apr_cli.distill.losses import auto_chunk_tokens, token_divergence
from apr_cli.distill.options import DEFAULT_WINDOWS
from apr_cli.errors import AprError
from apr_cli.model.checkpoint import load_model
from apr_cli.model.qwen2 import Qwen2ForCausalLM

Progress = Callable[[int, int], None]  # (windows done, windows in all)


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


@dataclass(frozen=True)
class WindowScores:
    """Means over every label of some windows; the teacher's entries are None without one."""

    loss: float  # the student's cross-entropy, nats per token
    tokens: int
    kl_to_teacher: float | None = None  # KL(teacher || student) at T=1, nats per token
    top1_agreement: float | None = None  # share of positions where both argmaxes agree
    teacher_loss: float | None = None  # the teacher's cross-entropy, when asked for


def block_sums(
    student_hidden: torch.Tensor,  # (N, C)
    student_weight: torch.Tensor,  # (V_s, C)
    labels: torch.Tensor,  # (N,)
    teacher_hidden: torch.Tensor | None = None,  # (N, C_t)
    teacher_weight: torch.Tensor | None = None,  # (V_t, C_t)
    *,
    teacher_loss: bool = False,
    chunk_tokens: int = 0,
) -> torch.Tensor:
    """(4,) sums over the N positions: student CE, KL(t || s), top-1 matches, teacher CE.

    Logits are made `chunk_tokens` tokens at a time (0: `auto_chunk_tokens`), so (N, V) never
    exists. Each model's CE uses its whole vocabulary (as `apr eval` scores it); KL and
    agreement use the rows both share.
    """
    vocab = student_weight.shape[0]
    if teacher_weight is not None:
        vocab = min(vocab, teacher_weight.shape[0])
    widest = max(w.shape[0] for w in (student_weight, teacher_weight) if w is not None)
    chunk = chunk_tokens or auto_chunk_tokens(widest)
    sums = torch.zeros(4, dtype=torch.float64, device=student_hidden.device)
    for start in range(0, labels.shape[0], chunk):
        rows = slice(start, start + chunk)
        s_logits = F.linear(student_hidden[rows], student_weight).float()  # (n, V_s)
        sums[0] += F.cross_entropy(s_logits, labels[rows], reduction="sum")
        if teacher_hidden is None:
            continue
        t_logits = F.linear(teacher_hidden[rows], teacher_weight).float()  # (n, V_t)
        if teacher_loss:
            sums[3] += F.cross_entropy(t_logits, labels[rows], reduction="sum")
        s_logits, t_logits = s_logits[:, :vocab], t_logits[:, :vocab]
        s_logp, t_logp = F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1)
        sums[1] += token_divergence(s_logp, t_logp, "forward-kl").sum()
        sums[2] += (s_logits.argmax(-1) == t_logits.argmax(-1)).sum()
    return sums


def score_windows(
    student: Qwen2ForCausalLM,
    source: ShardBatchSource,
    picks: list[int],
    *,
    seq_len: int,
    batch_size: int,
    backend: Backend,
    teacher: Qwen2ForCausalLM | None = None,
    teacher_loss: bool = False,
    on_progress: Progress | None = None,
) -> WindowScores:
    """Score windows `picks` of `source` in batches of `batch_size`; no state is changed.

    The data position, the RNG and the models' modes are left as they were, so scoring in the
    middle of training does not change what training does next. `on_progress(done, total)`
    hears of 0 windows scored first, then of each batch.
    """
    sums, tokens = torch.zeros(4, dtype=torch.float64, device=backend.device), 0
    if on_progress is not None:
        on_progress(0, len(picks))
    with torch.no_grad(), backend.autocast():
        for first in range(0, len(picks), batch_size):
            rows = np.stack([source.window(k, seq_len) for k in picks[first : first + batch_size]])
            ids = torch.from_numpy(rows.astype(np.int64)).to(backend.device)  # (B, T+1)
            inputs, labels = ids[:, :-1], ids[:, 1:]
            hidden = student.hidden_states(inputs).flatten(0, 1)  # (B*T, C)
            t_hidden, t_weight = None, None
            if teacher is not None:
                t_hidden = teacher.hidden_states(inputs).flatten(0, 1)  # (B*T, C_t)
                t_weight = teacher.output_weight
            sums += block_sums(
                hidden,
                student.output_weight,
                labels.flatten(),
                t_hidden,
                t_weight,
                teacher_loss=teacher_loss,
            )
            tokens += labels.numel()
            if on_progress is not None:
                on_progress(min(first + batch_size, len(picks)), len(picks))
    ce, kl, agree, t_ce = (s / tokens for s in sums.tolist())
    if teacher is None:
        return WindowScores(loss=ce, tokens=tokens)
    return WindowScores(
        loss=ce,
        tokens=tokens,
        kl_to_teacher=kl,
        top1_agreement=agree,
        teacher_loss=t_ce if teacher_loss else None,
    )


def evaluate(
    model: Qwen2ForCausalLM,
    source: ShardBatchSource,
    *,
    seq_len: int,
    windows: int = DEFAULT_WINDOWS,
    batch_size: int = 16,
    backend: Backend | None = None,
    on_progress: Progress | None = None,
) -> Evaluation:
    """Mean CE over every label of the chosen windows (`window_indices`), in batches.

    The same windows for the same dataset, seq_len and count, whatever the batch size.
    """
    if batch_size < 1:
        raise AprError(f"--batch-size must be > 0, got {batch_size}")
    backend = backend or select_backend("cpu")
    picks = window_indices(source.check_seq_len(seq_len), windows)
    model.eval()
    scores = score_windows(
        model,
        source,
        picks,
        seq_len=seq_len,
        batch_size=batch_size,
        backend=backend,
        on_progress=on_progress,
    )
    return Evaluation(
        loss=scores.loss,
        perplexity=math.exp(scores.loss),
        windows=len(picks),
        tokens=scores.tokens,
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
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Load a model and a dataset (ids checked against the model's vocab) and evaluate.

    `on_progress(done, total)` is first called once everything is checked (0 windows done).
    """
    if seq_len < 1:
        raise AprError(f"--seq-len must be > 0, got {seq_len}")
    backend = select_backend(device)
    model, info = load_model(spec, dtype=backend.teacher_dtype, device=backend.device)
    context = model.config.max_position_embeddings
    if seq_len > context:
        raise AprError(f"--seq-len {seq_len} exceeds the model's context of {context}")
    source = ShardBatchSource(dataset, vocab_size=model.config.vocab_size)
    result = evaluate(
        model,
        source,
        seq_len=seq_len,
        windows=windows,
        batch_size=batch_size,
        backend=backend,
        on_progress=on_progress,
    )
    return {
        "model": info,
        "data": source.describe(),
        "backend": backend.describe(),
        "selection": "evenly spaced" if result.windows < result.windows_per_epoch else "all",
        **result.to_dict(),
    }
