"""Token generation: greedy or temperature/top-p sampling, batched with the KV cache or not."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    model: Qwen2ForCausalLM,
    ids: torch.Tensor,
    start: int = 0,
    cache: KVCache | None = None,
    positions: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits of the last position only (B, vocab): the full (B, T, vocab) is never needed."""
    h = model.hidden_states(ids, start, cache, positions, mask)
    return F.linear(h[:, -1], model.output_weight)


@dataclass(frozen=True)
class Stop:
    """When a row of a batch stops: on an `eos_ids` token (left out of its output), or once the
    text of its new tokens contains one of `texts` (`decode` turns ids into text)."""

    eos_ids: frozenset[int] = frozenset()
    texts: tuple[str, ...] = ()
    decode: Callable[[list[int]], str] | None = None

    def reached(self, new: list[int]) -> bool:
        """Whether a row whose new tokens are `new` (the last one just added) is done."""
        if not self.texts:
            return False
        # A stop text ends in the last token, and every token is at least one byte, so the last
        # len(text) tokens hold it; decoding only those keeps each step's check short.
        tail = self.decode(new[-max(len(t.encode()) for t in self.texts) :])
        return any(t in tail for t in self.texts)


def check_request(
    model: Qwen2ForCausalLM,
    prompts: torch.Tensor,
    longest: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
) -> None:
    """Refuse bad sampling settings, out-of-vocabulary prompt ids and too-long sequences."""
    if max_new_tokens < 0:
        raise AprError(f"--max-new-tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise AprError(f"--temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise AprError(f"--top-p must be in (0, 1], got {top_p}")
    cfg = model.config
    bad = prompts[(prompts < 0) | (prompts >= cfg.vocab_size)]
    if bad.numel():
        raise AprError(
            f"prompt token {int(bad[0])} is outside the model's vocabulary "
            f"(0..{cfg.vocab_size - 1})"
        )
    if longest + max_new_tokens > cfg.max_position_embeddings:
        raise AprError(
            f"prompt ({longest}) + new tokens ({max_new_tokens}) exceed the model's "
            f"max_position_embeddings {cfg.max_position_embeddings}"
        )


def generate_batch(
    model: Qwen2ForCausalLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    stop: Stop = Stop(),
    temperature: float = 0.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    compile: bool = False,
) -> list[list[int]]:
    """The new token ids of each prompt, decoded together with the KV cache; greedy when
    temperature is 0. Each row stops on its own (`stop`, or `max_new_tokens`).

    Prompts of different lengths are left-padded: each row's RoPE positions start at its first
    real token, and the attention mask hides its padding, so a row's greedy tokens are those it
    would get alone. Finished rows leave the batch. `compile` runs the forward passes through
    torch.compile with dynamic shapes.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise AprError("every prompt needs at least one token")
    B, T = len(prompts), max(len(p) for p in prompts)
    device = model.output_weight.device
    ids = torch.zeros(B, T, dtype=torch.long, device=device)  # (B, T), left-padded
    for row, p in zip(ids, prompts):
        row[T - len(p) :] = torch.tensor(p, dtype=torch.long)
    check_request(model, ids, T, max_new_tokens, temperature, top_p)
    model.eval()
    step = torch.compile(last_logits, dynamic=True) if compile else last_logits
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0:
        return out
    total = T + max_new_tokens
    positions = real = prefill_mask = None
    if any(len(p) < T for p in prompts):
        pad = torch.tensor([T - len(p) for p in prompts], device=device)  # (B,)
        cols = torch.arange(total, device=device)
        positions = (cols - pad[:, None]).clamp(min=0)  # (B, total)
        real = cols >= pad[:, None]  # (B, total): False on the padding
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        # Every query also sees itself, so a padding query's softmax is never over nothing.
        eye = torch.eye(T, dtype=torch.bool, device=device)
        prefill_mask = ((causal & real[:, None, :T]) | eye)[:, None]  # (B, 1, T, T)
    rows = list(range(B))  # the output row of each batch row still running
    with torch.inference_mode():
        cache = KVCache(model, B, total)
        logits = step(
            model,
            ids,
            0,
            cache,
            None if positions is None else positions[:, :T],
            prefill_mask,
        )  # prefill fills cache slots 0..T-1
        for i in range(max_new_tokens):
            tokens = next_token(logits, temperature, top_p, generator).tolist()
            keep = []
            for b, (row, token) in enumerate(zip(rows, tokens)):
                if token in stop.eos_ids:
                    continue
                out[row].append(token)
                if not stop.reached(out[row]):
                    keep.append(b)
            if not keep or i + 1 == max_new_tokens:
                break
            if len(keep) < len(rows):  # finished rows leave: the batch shrinks, never idles
                index = torch.tensor(keep, device=device)
                cache.k, cache.v = cache.k[:, index], cache.v[:, index]
                if real is not None:
                    positions, real = positions[index], real[index]
                rows = [rows[b] for b in keep]
            token = torch.tensor([[tokens[b]] for b in keep], device=device)  # (B', 1)
            c = T + i  # the cache slot of this token
            logits = step(
                model,
                token,
                c,
                cache,
                None if positions is None else positions[:, c : c + 1],
                None if real is None else real[:, None, None, : c + 1],  # (B', 1, 1, c + 1)
            )
    return out


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
    """The new tokens (B, max_new_tokens) after prompts (B, T) of one length, no early stop.

    Without the cache every step re-runs the whole sequence (the reference the cache is tested
    and benchmarked against). `compile` runs the forward passes through torch.compile with
    dynamic shapes (a graph each for prefill, decode and the uncached forward; positions and
    lengths do not recompile).
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] == 0:
        raise AprError(
            f"prompt ids must be a non-empty (batch, length) tensor, got {list(prompt_ids.shape)}"
        )
    B, T = prompt_ids.shape
    if use_cache:
        kwargs = dict(temperature=temperature, top_p=top_p, generator=generator, compile=compile)
        new = generate_batch(model, prompt_ids.tolist(), max_new_tokens, **kwargs)
        return torch.tensor(new, dtype=torch.long, device=prompt_ids.device).view(B, max_new_tokens)
    check_request(model, prompt_ids, T, max_new_tokens, temperature, top_p)
    model.eval()
    step = torch.compile(last_logits, dynamic=True) if compile else last_logits
    with torch.inference_mode():
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=prompt_ids.device)
        seq = prompt_ids.clone(memory_format=torch.contiguous_format)
        for i in range(max_new_tokens):
            out[:, i] = token = next_token(step(model, seq), temperature, top_p, generator)
            seq = torch.cat([seq, token[:, None]], dim=1)  # (B, T + i + 1)
    return out
