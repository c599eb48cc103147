"""The KD loss against a top-k teacher cache: K + 1 bins (the teacher's K tokens and the rest)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from apr_cli.distill.losses import IGNORE_INDEX, LossParts, auto_chunk_tokens, token_divergence

# A bin this far down holds no mass (exp underflows to 0 in fp32) yet stays finite, so a bin
# both sides give it adds exactly 0 to every divergence (0 * finite) instead of 0 * inf = nan.
EMPTY_BIN = -1.0e4


@dataclass(frozen=True)
class TopKTeacher:
    """A top-k cache's teacher outputs for a batch, log-probs at the cache's temperature."""

    logp: torch.Tensor  # (B, T, K) float32, the K largest, in descending order
    tail: torch.Tensor  # (B, T) float32, log of the probability left to the other tokens
    ids: torch.Tensor  # (B, T, K) int64
    vocab_size: int  # the teacher's

    def to(self, device: torch.device) -> TopKTeacher:
        return TopKTeacher(
            self.logp.to(device), self.tail.to(device), self.ids.to(device), self.vocab_size
        )


def teacher_bins(teacher: TopKTeacher, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs over K + 1 bins (N, K+1), ids (N, K)) with tokens >= vocab moved to the tail.

    A moved token's bin becomes EMPTY_BIN and its id `vocab`, the student's empty extra column.
    The bins are renormalised: fp16 storage leaves their sum a little off 1.
    """
    k = teacher.logp.shape[-1]
    logp, ids = teacher.logp.reshape(-1, k), teacher.ids.reshape(-1, k)  # (N, K)
    outside = ids >= vocab
    moved = torch.where(outside, logp, float("-inf"))
    tail = torch.cat([teacher.tail.reshape(-1, 1), moved], dim=1).logsumexp(1, keepdim=True)
    bins = torch.cat([torch.where(outside, EMPTY_BIN, logp), tail], dim=1)  # (N, K+1)
    bins = bins - bins.logsumexp(1, keepdim=True)
    return bins, torch.where(outside, vocab, ids)


def _block_loss(
    hidden: torch.Tensor,  # (n, C)
    weight: torch.Tensor,  # (V, C)
    t_bins: torch.Tensor,  # (n, K+1)
    ids: torch.Tensor,  # (n, K), `V` for an empty bin
    labels: torch.Tensor,  # (n,)
    n: torch.Tensor,
    kind: str,
    temperature: float,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """(3,): loss, kd, ce summed over this block and divided by the batch's token count n."""
    logits = F.linear(hidden, weight).float()  # (n, V)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum") / n
    s_logp = F.pad(F.log_softmax(logits / temperature, dim=-1), (0, 1), value=float("-inf"))
    s_top = s_logp.gather(1, ids)  # (n, K); the extra column V gives -inf
    s_tail = s_logp.scatter(1, ids, float("-inf")).logsumexp(1, keepdim=True)  # (n, 1)
    s_bins = torch.cat([s_top, s_tail], dim=1).clamp(min=EMPTY_BIN)  # (n, K+1)
    keep = labels != IGNORE_INDEX
    kd = (token_divergence(s_bins, t_bins, kind, beta) * keep).sum() / n
    return torch.stack([alpha * temperature**2 * kd + (1.0 - alpha) * ce, kd, ce])


def topk_distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher: TopKTeacher,
    labels: torch.Tensor,
    *,
    kind: str = "forward-kl",
    temperature: float = 3.0,
    alpha: float = 0.7,
    beta: float = 0.5,
    chunk_tokens: int = 0,
) -> LossParts:
    """`distill_loss` with the teacher as top-k log-probs: the divergence over K + 1 bins.

    The student's softmax runs over the vocab both share; its bins are its probabilities of the
    teacher's K tokens and of everything else. Blocks of `chunk_tokens` tokens (0: auto) are
    recomputed in backward rather than kept, so memory grows with the block, not tokens x vocab.
    `kd` and `ce` carry no gradient.
    """
    vocab = min(student_weight.shape[0], teacher.vocab_size)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, C)
    weight = student_weight[:vocab]  # (V, C)
    t_bins, ids = teacher_bins(teacher, vocab)
    y = labels.reshape(-1)  # (N,)
    n = (y != IGNORE_INDEX).sum().clamp(min=1)
    chunk = max(1, min(chunk_tokens or auto_chunk_tokens(vocab), hidden.shape[0]))
    total = hidden.new_zeros(3, dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        rows = slice(start, start + chunk)
        args = (hidden[rows], weight, t_bins[rows], ids[rows], y[rows], n)
        options = (kind, temperature, alpha, beta)
        if torch.is_grad_enabled():
            total = total + checkpoint(_block_loss, *args, *options, use_reentrant=False)
        else:
            total = total + _block_loss(*args, *options)
    return LossParts(loss=total[0], kd=total[1].detach(), ce=total[2].detach())
