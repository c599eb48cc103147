"""Knowledge-distillation losses: per token, over every non-ignored position."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from apr_cli.distill.options import LOSS_KINDS

IGNORE_INDEX = -100


@dataclass(frozen=True)
class LossParts:
    """The mixed loss and its two terms, each a mean over non-ignored tokens."""

    loss: torch.Tensor
    kd: torch.Tensor
    ce: torch.Tensor


def token_divergence(
    student_logp: torch.Tensor, teacher_logp: torch.Tensor, kind: str, beta: float = 0.5
) -> torch.Tensor:
    """Divergence per token (N,) between two (N, V) log-distributions.

    forward-kl: KL(teacher || student), mass-covering; reverse-kl: KL(student || teacher),
    mode-seeking; jsd: beta * KL(t || m) + (1 - beta) * KL(s || m), m = beta * t + (1 - beta) * s
    (beta = 0.5 is the symmetric Jensen-Shannon divergence).
    """
    if kind == "forward-kl":
        return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)
    if kind == "reverse-kl":
        return (student_logp.exp() * (student_logp - teacher_logp)).sum(-1)
    if kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
        mix_logp = torch.logsumexp(
            torch.stack(
                [
                    teacher_logp + torch.log(torch.tensor(beta)),
                    student_logp + torch.log(torch.tensor(1.0 - beta)),
                ]
            ),
            dim=0,
        )  # (N, V)
        kl_t = (teacher_logp.exp() * (teacher_logp - mix_logp)).sum(-1)
        kl_s = (student_logp.exp() * (student_logp - mix_logp)).sum(-1)
        return beta * kl_t + (1.0 - beta) * kl_s
    raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(LOSS_KINDS)}")


def _soft_log_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) over the last dimension, in fp32."""
    return F.log_softmax(logits.float() / temperature, dim=-1)


def _partial_loss(
    student_logits: torch.Tensor,
    teacher_logp: torch.Tensor | None,
    labels: torch.Tensor,
    n: torch.Tensor,
    kind: str,
    temperature: float,
    alpha: float,
    beta: float,
    ignore_index: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kd, ce) summed over these (N, V) rows and divided by the batch's token count n.

    The teacher comes as softened log-probabilities so that its raw logits can be freed early.
    """
    s = student_logits.float()
    ce = F.cross_entropy(s, labels, ignore_index=ignore_index, reduction="sum") / n
    if teacher_logp is None:
        return ce, torch.zeros_like(ce), ce
    s_logp = _soft_log_probs(s, temperature)  # (N, V)
    # Masking rather than indexing the kept rows avoids copying the (N, V) logits.
    keep = labels != ignore_index
    kd = (token_divergence(s_logp, teacher_logp, kind, beta) * keep).sum() / n
    return alpha * temperature**2 * kd + (1.0 - alpha) * ce, kd, ce


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    kind: str = "forward-kl",
    temperature: float = 3.0,
    alpha: float = 0.7,
    beta: float = 0.5,
    ignore_index: int = IGNORE_INDEX,
) -> LossParts:
    """alpha * T^2 * D(teacher_T, student_T) + (1 - alpha) * CE(student, labels).

    `alpha` weighs the KD term. Logits are (..., V); when the two vocabularies differ by padding
    rows only the shared first V rows are compared. With no teacher the loss is CE alone.
    """
    vocab = student_logits.shape[-1]
    t_logp = None
    if teacher_logits is not None:
        vocab = min(vocab, teacher_logits.shape[-1])
        t_logp = _soft_log_probs(teacher_logits[..., :vocab].reshape(-1, vocab), temperature)
    y = labels.reshape(-1)  # (N,)
    n = (y != ignore_index).sum().clamp(min=1)
    s = student_logits[..., :vocab].reshape(-1, vocab)  # (N, V)
    parts = _partial_loss(s, t_logp, y, n, kind, temperature, alpha, beta, ignore_index)
    return LossParts(*parts)


# A block's fp32 logits take at most this many bytes; the loss holds about nine such (N, V)
# tensors at once. 165 tokens at Qwen's vocab: with fewer, the CPU matmuls against the
# (V, C) weight lose speed (half at 55 tokens), with more, memory grows for little gain.
BLOCK_LOGITS_BYTES = 96 * 2**20


def auto_chunk_tokens(vocab: int) -> int:
    """Tokens per loss block so that a block's fp32 logits fit in BLOCK_LOGITS_BYTES."""
    return max(1, BLOCK_LOGITS_BYTES // (4 * vocab))


class _ChunkedDistillLoss(torch.autograd.Function):
    """The loss and its gradients in one forward pass over token blocks; backward only scales.

    Only one block's (chunk, V) logits exist at a time, never the full (N, V) of either model.
    """

    @staticmethod
    def forward(
        ctx,
        student_hidden: torch.Tensor,  # (N, C)
        student_weight: torch.Tensor,  # (V_s, C)
        teacher_hidden: torch.Tensor | None,  # (N, C_t)
        teacher_weight: torch.Tensor | None,  # (V_t, C_t)
        labels: torch.Tensor,  # (N,)
        vocab: int,
        chunk: int,
        kind: str,
        temperature: float,
        alpha: float,
        beta: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_h, need_w = ctx.needs_input_grad[:2]
        need_grad = need_h or need_w
        grad_h = torch.zeros_like(student_hidden) if need_h else None
        # fp32 so that the sum over blocks does not round at each step under bf16 autocast.
        grad_w = torch.zeros_like(student_weight, dtype=torch.float32) if need_w else None
        n = (labels != IGNORE_INDEX).sum().clamp(min=1)
        sums = [student_hidden.new_zeros((), dtype=torch.float32) for _ in range(3)]
        weight = student_weight[:vocab]  # (V, C)
        device = weight.device.type
        if torch.is_autocast_enabled(device):  # cast once, not once per block as autocast would
            weight = weight.to(torch.get_autocast_dtype(device))
        for start in range(0, labels.shape[0], chunk):
            rows = slice(start, start + chunk)
            hidden = student_hidden[rows]  # (n, C)
            t_logp = None
            if teacher_hidden is not None:
                t_logits = F.linear(teacher_hidden[rows], teacher_weight[:vocab])  # (n, V)
                t_logp = _soft_log_probs(t_logits, temperature)
                del t_logits  # one (n, V) fewer while the student's graph is alive
            # Matmuls follow the ambient autocast (bf16 on CUDA); the loss math runs in fp32.
            logits = F.linear(hidden, weight).float().requires_grad_(need_grad)  # (n, V)
            with torch.set_grad_enabled(need_grad):
                parts = _partial_loss(
                    logits,
                    t_logp,
                    labels[rows],
                    n,
                    kind,
                    temperature,
                    alpha,
                    beta,
                    IGNORE_INDEX,
                )
            for total, part in zip(sums, parts):
                total += part.detach()
            if not need_grad:
                continue
            (grad_logits,) = torch.autograd.grad(parts[0], logits)  # (n, V)
            if need_h:
                grad_h[rows] = grad_logits @ weight  # (n, C)
            if need_w:
                grad_w[:vocab].addmm_(grad_logits.T, hidden.float())  # (V, C)
        if need_w:
            grad_w = grad_w.to(student_weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        loss, kd, ce = sums
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_kd, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        # In place: a scaled copy of the (V, C) weight gradient would double its memory.
        grads = [None if g is None else g.mul_(grad_loss) for g in (grad_h, grad_w)]
        return *grads, *([None] * 9)


def distill_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    kind: str = "forward-kl",
    temperature: float = 3.0,
    alpha: float = 0.7,
    beta: float = 0.5,
    chunk_tokens: int = 0,
) -> LossParts:
    """`kd_loss` from final hidden states (B, T, C) and the (V, C) output projections, chunked.

    Logits are computed `chunk_tokens` tokens at a time (0: `auto_chunk_tokens`), gradients
    included, so memory grows with the block rather than with tokens x vocab. `kd` and `ce`
    carry no gradient.
    """
    vocab = student_weight.shape[0]
    if teacher_hidden is not None:
        vocab = min(vocab, teacher_weight.shape[0])
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, C)
    teacher = None
    if teacher_hidden is not None:
        teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])  # (N, C_t)
    if not torch.is_grad_enabled():  # evaluation (no_grad / inference_mode): no gradients to make
        hidden, student_weight = hidden.detach(), student_weight.detach()
    chunk = min(chunk_tokens or auto_chunk_tokens(vocab), hidden.shape[0])
    loss, kd, ce = _ChunkedDistillLoss.apply(
        hidden,
        student_weight,
        teacher,
        teacher_weight,
        labels.reshape(-1),
        vocab,
        max(1, chunk),
        kind,
        temperature,
        alpha,
        beta,
    )
    return LossParts(loss=loss, kd=kd, ce=ce)
