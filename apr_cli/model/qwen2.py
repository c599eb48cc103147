"""The Qwen2 family as one causal LM in plain PyTorch, parameter names matching Hugging Face's.

Qwen2, Llama, Qwen3 and Qwen3-MoE share this block; what differs is data in the config's
`Architecture` (q/k/v biases, q/k norms, dense or routed MLPs), not copies of the code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from apr_cli.model.config import ModelConfig
from apr_cli.model.mlp import MLP, RouterStats, SparseMoE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 whatever the weights' dtype, as Qwen2 does.
        h = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        return self.weight * h.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE: x * cos + cat(-x2, x1) * sin, as x * cos + roll(x) * signed_sin."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        qk_norm = cfg.arch.qk_norm
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if qk_norm else None

    def forward(
        self, x, cos, signed_sin, cache: KVCache | None = None, start=0, layer=0, mask=None
    ):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)  # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim)  # (B, T, nkv, hd)
        if self.q_norm is not None:  # Qwen3: each head's q and k normalised before RoPE
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, nh, T, hd), (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, signed_sin), apply_rope(k, cos, signed_sin)
        causal = mask is None
        if cache is not None:
            k, v = cache.update(layer, start, k, v)  # (B, nkv, start+T, hd)
            causal = False
            # Queries sit at start..start+T-1; is_causal would align them to 0.
            if T > 1 and mask is None:
                q_pos = torch.arange(start, start + T, device=x.device)[:, None]
                mask = torch.arange(k.shape[2], device=x.device)[None, :] <= q_pos
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv != self.n_head
        )  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp: MLP | SparseMoE):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, cos, signed_sin, cache=None, start=0, layer=0, mask=None, router=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, signed_sin, cache, start, layer, mask)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, router) if isinstance(self.mlp, SparseMoE) else self.mlp(h))


class Backbone(nn.Module):
    """Embeddings, blocks and the final norm: Hugging Face's `model.*` tensors."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            Block(
                cfg,
                SparseMoE(cfg) if cfg.is_sparse(i) else MLP(cfg.hidden_size, cfg.intermediate_size),
            )
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen2ForCausalLM(nn.Module):
    """Any architecture of the family (cfg.architecture): Qwen2, Llama, Qwen3, Qwen3-MoE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )

    @property
    def output_weight(self) -> torch.Tensor:
        """The (vocab, hidden) projection to logits, tied or not."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def init_weights(self, seed: int) -> Qwen2ForCausalLM:
        """Seeded Hugging Face-style init: normal(0, 0.02) weights, zero biases, unit norms.

        Drawn on the parameters' device (a model built under `with torch.device("cuda")` is
        initialised there); the CPU's draws stay those of every earlier run.
        """
        device = next(self.parameters()).device
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, device=device) * 0.02)
        return self

    def rope(self, start: int, T: int, dtype: torch.dtype, device: torch.device):
        """RoPE (cos, signed_sin) for positions start..start+T-1, each (T, head_dim)."""
        # Computed in fp32 rather than kept as a buffer: a buffer would be cast by
        # model.to(bfloat16) and left empty by a meta-device build.
        hd = self.config.head_dim
        exponent = torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd
        inv_freq = 1.0 / (self.config.rope_theta**exponent)  # (hd/2,)
        pos = torch.arange(start, start + T, device=device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)  # (T, hd/2)
        cos, sin = freqs.cos(), freqs.sin()
        # sin with rotate_half's sign folded in, so apply_rope needs one roll, not chunk+neg+cat.
        return torch.cat((cos, cos), -1).to(dtype), torch.cat((-sin, sin), -1).to(dtype)

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        start: int = 0,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        router: RouterStats | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states (B, T, hidden) of cache slots start..start+T-1.

        With a cache, keys and values of earlier slots come from it and this call's are stored
        in it; without one, attention sees only these T positions. A batch of left-padded rows
        (batched generation) gives each row's RoPE `positions` (B, T) and the attention `mask`
        (B, 1, T, start+T), True where a query may see a key; both need the cache. With
        `router`, the sparse layers add their routing statistics to it (load-balancing loss).
        """
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        T = input_ids.shape[1]
        if positions is not None:
            cos, signed_sin = cache.cos[positions][:, None], cache.signed_sin[positions][:, None]
        elif cache is not None:
            cos, signed_sin = cache.cos[start : start + T], cache.signed_sin[start : start + T]
        else:
            cos, signed_sin = self.rope(start, T, x.dtype, x.device)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, signed_sin, cache, start, i, mask, router)  # i: its cache slot
        return self.model.norm(x)

    def forward(
        self, input_ids: torch.Tensor, start: int = 0, cache: KVCache | None = None
    ) -> torch.Tensor:
        """Logits (B, T, vocab)."""
        return F.linear(self.hidden_states(input_ids, start, cache), self.output_weight)


class KVCache:
    """Keys and values of every layer, preallocated for incremental decoding, and the RoPE rows
    of every position they can hold (a decode step slices one row instead of rebuilding it).

    A plain object passed to each call rather than model state, so the model stays stateless and
    torch.compile sees the cache as an input whose length may vary.
    """

    def __init__(self, model: Qwen2ForCausalLM, batch: int, max_len: int):
        c, p = model.config, model.output_weight
        shape = (c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim)
        self.k = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.cos, self.signed_sin = model.rope(0, max_len, p.dtype, p.device)  # (max_len, hd)

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        """Store k, v (B, n_kv, T, hd) at start..; return the layer's keys and values so far."""
        end = start + k.shape[2]
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv, end, hd)


def build_model(cfg: ModelConfig, seed: int = 0) -> Qwen2ForCausalLM:
    """A freshly initialised model in fp32 on the CPU."""
    return Qwen2ForCausalLM(cfg).init_weights(seed)


def meta_model(cfg: ModelConfig) -> Qwen2ForCausalLM:
    """The model's shapes on the meta device, for checks, plans and weights assigned later."""
    with torch.device("meta"), SkipInit():
        return Qwen2ForCausalLM(cfg)


class SkipInit(TorchFunctionMode):
    """torch.nn.init's fills as no-ops. A meta tensor has no values to fill, and filling one
    imports torch._dynamo (and with it FSDP and DTensor): seconds of every plan."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return kwargs["tensor"]
        return func(*args, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
