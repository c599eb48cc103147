"""Token generation: greedy or temperature/top-p sampling, with or without the KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from apr_cli.errors import AprError
from apr_cli.model.qwen2 import KVCache, Qwen2ForCausalLM


def next_token(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
) -> torch.Tensor:
    """One token per row from last-position logits (B, vocab) -> (B,)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p; the top token always stays.
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def last_logits(
    model: Qwen2ForCausalLM, ids: torch.Tensor, start: int = 0, cache: KVCache | None = None
) -> torch.Tensor:
    """Logits of the last position only (B, vocab): the full (B, T, vocab) is never needed."""
    return F.linear(model.hidden_states(ids, start, cache)[:, -1], model.output_weight)


def generate(
    model: Qwen2ForCausalLM,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    compile: bool = False,
) -> torch.Tensor:
    """The new tokens (B, max_new_tokens) after prompts (B, T); greedy when temperature is 0.

    `compile` runs the forward passes through torch.compile with dynamic shapes (a graph each
    for prefill, decode and the uncached forward; positions and lengths do not recompile).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise AprError(
            f"prompt ids must be a non-empty (batch, length) tensor, got {list(prompt_ids.shape)}"
        )
    if max_new_tokens < 0:
        raise AprError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise AprError(f"--temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise AprError(f"--top-p must be in (0, 1], got {top_p}")
    cfg = model.config
    bad = prompt_ids[(prompt_ids < 0) | (prompt_ids >= cfg.vocab_size)]
    if bad.numel():
        raise AprError(
            f"prompt token {int(bad[0])} is outside the model's vocabulary "
            f"(0..{cfg.vocab_size - 1})"
        )
    B, T = prompt_ids.shape
    if T + max_new_tokens > cfg.max_position_embeddings:
        raise AprError(
            f"prompt ({T}) + new tokens ({max_new_tokens}) exceed the model's "
            f"max_position_embeddings {cfg.max_position_embeddings}"
        )
    model.eval()
    step = torch.compile(last_logits, dynamic=True) if compile else last_logits
    with torch.inference_mode():
        # A fresh, dense inference tensor like every later step's input, so compiled steps see
        # one kind and one stride pattern.
        prompt_ids = prompt_ids.clone(memory_format=torch.contiguous_format)
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=prompt_ids.device)
        if not use_cache:
            seq = prompt_ids
            for i in range(max_new_tokens):
                out[:, i] = token = next_token(step(model, seq), temperature, top_p, generator)
                seq = torch.cat([seq, token[:, None]], dim=1)  # (B, T + i + 1)
            return out
        cache = KVCache(model, B, T + max_new_tokens)
        logits = step(model, prompt_ids, 0, cache)  # prefill fills positions 0..T-1
        for i in range(max_new_tokens):
            out[:, i] = token = next_token(logits, temperature, top_p, generator)
            if i + 1 < max_new_tokens:
                logits = step(model, token[:, None], T + i, cache)  # (B, 1) at position T + i
    return out
