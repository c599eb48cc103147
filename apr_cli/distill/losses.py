"""Knowledge-distillation losses: per token, over every non-ignored position."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_KINDS = ("forward-kl", "reverse-kl", "jsd")


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
    if teacher_logits is not None:
        vocab = min(vocab, teacher_logits.shape[-1])
    s = student_logits[..., :vocab].reshape(-1, vocab).float()  # (N, V)
    y = labels.reshape(-1)  # (N,)
    keep = y != ignore_index
    n = keep.sum().clamp(min=1)
    ce = F.cross_entropy(s, y, ignore_index=ignore_index, reduction="sum") / n
    if teacher_logits is None:
        return LossParts(loss=ce, kd=torch.zeros_like(ce), ce=ce)
    t = teacher_logits[..., :vocab].reshape(-1, vocab).float()
    s_logp = F.log_softmax(s[keep] / temperature, dim=-1)
    t_logp = F.log_softmax(t[keep] / temperature, dim=-1)
    kd = token_divergence(s_logp, t_logp, kind, beta).sum() / n
    loss = alpha * temperature**2 * kd + (1.0 - alpha) * ce
    return LossParts(loss=loss, kd=kd, ce=ce)


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
    """`kd_loss` from final hidden states (B, T, C) and the (V, C) output projections."""
    student_logits = F.linear(student_hidden, student_weight)  # (B, T, V_s)
    teacher_logits = None
    if teacher_hidden is not None:
        with torch.no_grad():
            teacher_logits = F.linear(teacher_hidden, teacher_weight)  # (B, T, V_t)
    return kd_loss(
        student_logits,
        teacher_logits,
        labels,
        kind=kind,
        temperature=temperature,
        alpha=alpha,
        beta=beta,
    )
