"""What fills a block's MLP slot: a dense SwiGLU MLP, or Qwen3-MoE's routed SwiGLU experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from apr_cli.model.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RouterStats:
    """Routing statistics summed over the sparse layers of one forward pass, for the
    load-balancing loss (Switch Transformer's, as transformers computes it for Qwen3-MoE).

    A plain object passed to the call, like the KV cache, so the model stays stateless.
    """

    def __init__(self):
        self.assigned: torch.Tensor | None = None  # (E,) (token, slot) pairs routed to each expert
        self.prob_sum: torch.Tensor | None = None  # (E,) router probability summed over tokens
        self.tokens = 0  # tokens seen, counted once per sparse layer

    def add(self, probs: torch.Tensor, chosen: torch.Tensor) -> None:
        """probs (N, E) over all experts; chosen (N, k) the experts each token went to."""
        assigned = chosen.flatten().bincount(minlength=probs.shape[1]).to(probs.dtype)
        if self.assigned is None:
            self.assigned, self.prob_sum = assigned, probs.sum(0)
        else:
            self.assigned, self.prob_sum = self.assigned + assigned, self.prob_sum + probs.sum(0)
        self.tokens += probs.shape[0]

    def loss(self) -> torch.Tensor:
        """E * sum_e (share of assignments to e) * (mean probability of e); 0 with no routing."""
        if self.assigned is None:
            return torch.zeros(())
        num_experts = self.assigned.shape[0]
        return num_experts * (self.assigned * self.prob_sum).sum() / self.tokens**2


class SparseMoE(nn.Module):
    """Qwen3-MoE's MLP: a router sends each token to its top-k SwiGLU experts.

    Tokens are grouped by expert (one sort), and only experts that received tokens run, each on
    one matrix of its tokens; outputs are weighted and summed back per token.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.num_experts)
        )

    def forward(self, x: torch.Tensor, router: RouterStats | None = None) -> torch.Tensor:
        B, T, C = x.shape
        x = x.reshape(-1, C)  # (N, C)
        probs, weights, chosen = self.route(x)
        if router is not None:
            router.add(probs, chosen)
        return self.run_experts(x, weights, chosen).view(B, T, C)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Router probabilities (N, E) in fp32; each token's top-k weights and experts (N, k)."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return probs, weights, chosen

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor):
        """The weighted sum of each token's experts' outputs (N, C)."""
        flat = chosen.flatten()  # (N*k,) the expert of each (token, slot) pair
        order = flat.argsort(stable=True)  # pairs grouped by expert
        counts = flat.bincount(minlength=len(self.experts)).tolist()
        tokens = order // self.top_k  # (N*k,) the token of each grouped pair
        groups = x[tokens].split(counts)  # one (n_e, C) matrix per expert
        # Training also runs idle experts, on zero rows (no arithmetic): each then has a zero
        # gradient on every rank, as DDP and FSDP2's collectives expect. Inference skips them.
        run_idle = torch.is_grad_enabled()
        y = torch.cat([self.experts[e](g) for e, g in enumerate(groups) if counts[e] or run_idle])
        y = y * weights.flatten()[order, None].to(x.dtype)  # (N*k, C)
        return torch.zeros_like(x).index_add_(0, tokens, y)
