"""Knowledge-distillation losses: per token, over every non-ignored position."""

from __future__ import annotations

import functools
import math
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


@dataclass(frozen=True)
class LossOptions:
    """A run's loss settings, as `distill_loss` and `topk_distill_loss` take them."""

    kind: str = "forward-kl"
    temperature: float = 3.0
    alpha: float = 0.7  # weight of the KD term
    beta: float = 0.5  # jsd mixture weight
    chunk_tokens: int = 0  # tokens per block; 0: auto_chunk_tokens
    vocab_size: int = 0  # rows the loss covers; 0: every shared row


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


# A block's fp32 logits take at most this many bytes; the loss holds four such (N, V) buffers
# (five in bf16). Measured on a 2-core AMX CPU at Qwen's vocab (docs/performance.md): fp32
# matmuls against the (V, C) weight reach their rate at ~160 rows (96 MiB: 165 tokens); AMX bf16
# ones keep gaining up to ~500 rows, and each block's bf16 weight-gradient product added into
# the fp32 sum costs less per token in larger blocks (loss fwd+bwd 9.1 ms per token at 441,
# 10.1 at 330, 12.9 at 192), but 441-token blocks held a bf16 step at 0.34x the plain loop's
# memory, so bf16 takes 192 MiB (330 tokens) for <= 0.3x. Hidden sizes do not enter: per block
# and per token, matmul and that addition both grow with C alike.
BLOCK_LOGITS_BYTES = {torch.float32: 96 * 2**20, torch.bfloat16: 192 * 2**20}


def auto_chunk_tokens(vocab: int, dtype: torch.dtype = torch.float32) -> int:
    """Tokens per loss block for matmuls in `dtype`, so that block logits fit the budget."""
    budget = BLOCK_LOGITS_BYTES.get(dtype, BLOCK_LOGITS_BYTES[torch.bfloat16])
    return max(1, budget // (4 * vocab))


def _rowdot(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) for (n, V) tensors, the product written into `out` (which may be a or b).

    Two passes; a batched (1, V) @ (V, 1) matmul takes no buffer but costs about six.
    """
    return torch.mul(a, b, out=out).sum(-1)  # (n,)


def _log_sum_exp(probs: torch.Tensor, z_max: torch.Tensor) -> torch.Tensor:
    """logsumexp of each row of z (n, V) from probs = softmax(z) and z's row maxima, one read.

    At the largest logit lse = z - log softmax(z), and that probability is >= 1/V, so its log
    is as exact as the probability itself.
    """
    return z_max - probs.amax(-1).log()  # (n,)


def block_loss(
    logits: torch.Tensor,
    teacher: torch.Tensor | None,
    scratch: tuple[torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    kind: str,
    temperature: float,
    alpha: float,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token KD and CE of one block and d loss / d logits in closed form, no autograd.

    logits: (n, V) fp32 student logits; teacher: (n, V) fp32 teacher logits already divided by
    T, or None; scratch: two more (n, V) fp32 buffers. All four are overwritten: the gradient
    lands in one of them, which is returned with kd (n,) and ce (n,). The gradient is per token,
    before the per-token weight keep / token count, which the caller applies on the (n, C) side.
    With z = logits / T, q = softmax(z), p = softmax(logits) and the teacher's q_t:
      forward KL: d/dz = q - q_t
      reverse KL: d/dz = q * (log q - log q_t - KL(q || q_t))
      JSD:        d/dz = (1 - beta) * q * (log q - log m - KL(q || m)), m = beta q_t + (1 - beta) q
    and d loss / d logits = alpha * T * d/dz + (1 - alpha) * (p - onehot(label)). Each
    distribution costs one softmax and its log-sum-exp a read of the row maxima of the softmax
    (z's own maxima are those of the logits over T).
    """
    grad, work = scratch
    rows = torch.arange(labels.shape[0], device=labels.device)
    y = labels.clamp(min=0)  # ignored rows get any finite gradient; their weight is 0
    top = logits.amax(-1)  # (n,)
    p = torch.softmax(logits, -1, out=grad)
    ce = _log_sum_exp(p, top) - logits[rows, y]  # (n,)
    ce_weight = 1.0 if teacher is None else 1.0 - alpha  # with no teacher the loss is CE alone
    if ce_weight != 1.0:
        grad.mul_(ce_weight)
    grad[rows, y] -= ce_weight  # the CE part: (1 - alpha) * (p - onehot)
    if teacher is None:
        return grad, torch.zeros_like(ce), ce
    q_t = torch.softmax(teacher, -1, out=work)  # (n, V)
    lse_t = _log_sum_exp(q_t, teacher.amax(-1))  # (n,)
    z = logits.div_(temperature) if temperature != 1.0 else logits  # (n, V) student
    # Division by T > 0 is monotonic in floating point too, so z's maxima are exactly these.
    z_max = top / temperature if temperature != 1.0 else top
    if kind == "forward-kl":  # KL = sum q_t (z_t - z) - lse_t + lse
        kd = _rowdot(q_t, teacher.sub_(z), out=teacher) - lse_t
        q = torch.softmax(z, -1, out=teacher)
        kd += _log_sum_exp(q, z_max)
        d_z = q.sub_(q_t)
    elif kind == "reverse-kl":  # KL = sum q (z - z_t) - lse + lse_t
        q = torch.softmax(z, -1, out=work)
        shift = _log_sum_exp(q, z_max) - lse_t  # log q - log q_t = z - z_t - shift
        diff = torch.sub(z, teacher, out=teacher)
        d_z = torch.mul(q, diff, out=logits)  # q (z - z_t); z is no longer needed
        kd = d_z.sum(-1) - shift
        d_z.addcmul_(q, (kd + shift).unsqueeze(1), value=-1.0)
    elif kind == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
        q = torch.softmax(z, -1, out=work)
        log_q = z.sub_(_log_sum_exp(q, z_max).unsqueeze(1))
        log_qt = teacher.sub_(lse_t.unsqueeze(1))
        log_b, log_1b = math.log(beta), math.log(1.0 - beta)
        # u = log(beta q_t / m) and w = log((1 - beta) q / m) are <= 0, so their exps cannot
        # overflow: beta KL(q_t || m) = sum m e^u u - beta log beta, (1 - beta) KL(q || m) likewise.
        log_m = torch.logaddexp(log_qt.add_(log_b), log_q.add_(log_1b), out=work)
        u, w = log_qt.sub_(log_m), log_q.sub_(log_m)
        m = log_m.exp_()
        e_u = u.exp_()
        beta_kl_t = _rowdot(m, e_u.xlogy_(e_u), out=e_u) - beta * log_b  # e^u u as e^u log e^u
        mixed_q = torch.exp(w, out=e_u).mul_(m)  # (1 - beta) q
        d_z = torch.mul(mixed_q, w, out=m)  # (1 - beta) q w; m is no longer needed
        kl_s = d_z.sum(-1) / (1.0 - beta) - log_1b
        kd = beta_kl_t + (1.0 - beta) * kl_s
        d_z.addcmul_(mixed_q, (log_1b + kl_s).unsqueeze(1), value=-1.0)
    else:
        raise ValueError(f"unknown loss {kind!r}; choose from {', '.join(LOSS_KINDS)}")
    grad.add_(d_z, alpha=alpha * temperature)
    return grad, kd, ce


class _ChunkedDistillLoss(torch.autograd.Function):
    """The loss and its gradients in one forward pass over token blocks; backward only scales.

    Only one block's (chunk, V) logits exist at a time, never the full (N, V) of either model,
    and the block buffers are allocated once per call, not once per block.
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
        mm_dtype: torch.dtype,
        compile_blocks: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_h, need_w = ctx.needs_input_grad[:2]
        device = student_hidden.device
        # Matmuls run in mm_dtype (the ambient autocast's: bf16 on CUDA or with --dtype bf16),
        # each operand cast once per call rather than once per block; the loss math runs in fp32.
        weight = student_weight[:vocab].to(mm_dtype)  # (V, C)
        hidden = student_hidden.to(mm_dtype)  # (N, C)
        has_teacher = teacher_hidden is not None
        if has_teacher:  # softened logits straight from the matmul: (h / T) @ W^T
            teacher_w = teacher_weight[:vocab].to(mm_dtype)  # (V, C_t)
            teacher_hidden = (teacher_hidden.float() / temperature).to(mm_dtype)  # (N, C_t)
        size = min(chunk, labels.shape[0])
        fp32 = [torch.empty(size, vocab, device=device) for _ in range(4)]  # (chunk, V) each
        low = None  # a matmul's (chunk, V) output before it is widened to fp32
        if mm_dtype != torch.float32:
            low = torch.empty(size, vocab, device=device, dtype=mm_dtype)
        keep = (labels != IGNORE_INDEX).float()
        token_weight = keep / keep.sum().clamp(min=1)  # (N,) each token's share of the mean
        grad_h = torch.zeros_like(student_hidden) if need_h else None
        # fp32 so that the sum over blocks does not round at each step under bf16.
        grad_w = torch.zeros_like(student_weight, dtype=torch.float32) if need_w else None
        kd_sum = ce_sum = torch.zeros((), device=device)
        block_fn = compiled_block_loss() if compile_blocks else block_loss
        # Every dtype below is explicit: autocast would run the row dots and the (n,) sums in
        # bf16 too, and the casts it inserts cost more than the dots.
        with torch.autocast(device.type, enabled=False):
            for start in range(0, labels.shape[0], chunk):
                block = slice(start, start + chunk)
                h = hidden[block]  # (n, C)
                logits, teacher, *scratch = (b[: h.shape[0]] for b in fp32)  # (n, V) each
                _matmul_into(logits, h, weight.T, low)
                if has_teacher:
                    _matmul_into(teacher, teacher_hidden[block], teacher_w.T, low)
                grad, kd, ce = block_fn(
                    logits,
                    teacher if has_teacher else None,
                    scratch,
                    labels[block],
                    kind,
                    temperature,
                    alpha,
                    beta,
                )
                w = token_weight[block]  # (n,)
                kd_sum = kd_sum + kd @ w
                ce_sum = ce_sum + ce @ w
                if not (need_h or need_w):
                    continue
                if low is not None:  # the gradient's matmuls in the low dtype too
                    grad = low[: h.shape[0]].copy_(grad)
                # The per-token weights scale the (n, C) side, not the (n, V) gradient.
                if need_h:
                    grad_h[block] = (grad @ weight).float().mul_(w.unsqueeze(1))  # (n, C)
                if need_w:
                    h_w = (h.float() * w.unsqueeze(1)).to(mm_dtype)  # (n, C), a new tensor
                    _add_product(grad_w[:vocab], grad.T, h_w)  # (V, C)
        if need_w:
            grad_w = grad_w.to(student_weight.dtype)
        ctx.save_for_backward(grad_h, grad_w)
        kd_weight = alpha * temperature**2 if has_teacher else 0.0
        ce_weight = 1.0 - alpha if has_teacher else 1.0
        loss = kd_weight * kd_sum + ce_weight * ce_sum
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return loss, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_kd, _grad_ce):
        grad_h, grad_w = ctx.saved_tensors
        # In place: a scaled copy of the (V, C) weight gradient would double its memory.
        grads = [None if g is None else g.mul_(grad_loss) for g in (grad_h, grad_w)]
        return *grads, *([None] * 11)


@functools.cache
def compiled_block_loss():
    """`block_loss` through torch.compile, once per process: on a GPU inductor fuses its passes
    over each (block, V) row into a few kernels. Shapes are static until a second block size
    (a batch's last, shorter block) makes them dynamic."""
    return torch.compile(block_loss)


def _matmul_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, low: torch.Tensor | None):
    """out (n, V) fp32 = a @ b, through the low-precision buffer when a and b are bf16."""
    if low is None:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a, b, out=low[: out.shape[0]]))


# Rows of the weight gradient per low-precision product: each lands in a low-precision
# temporary before it is added into the fp32 sum; slicing the vocabulary bounds that temporary
# (29 MiB at C = 896) where one product would take (V, C) (260 MiB at Qwen2.5-0.5B's size).
PRODUCT_ROWS = 16384


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc (V, C) fp32 += a (V, n) @ b (n, C), whatever the dtype of a and b."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
        return
    for start in range(0, a.shape[0], PRODUCT_ROWS):
        rows = slice(start, start + PRODUCT_ROWS)
        acc[rows] += a[rows] @ b


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
    vocab_size: int = 0,
    compile_blocks: bool = False,
) -> LossParts:
    """`kd_loss` from final hidden states (B, T, C) and the (V, C) output projections, chunked.

    Logits are computed `chunk_tokens` tokens at a time (0: `auto_chunk_tokens`), gradients
    included, so memory grows with the block rather than with tokens x vocab. `kd` and `ce`
    carry no gradient. `vocab_size` (when > 0) drops the rows at or beyond it from both
    softmaxes, and from the student's gradient: a checkpoint's padding rows past its tokenizer.
    `compile_blocks` runs each block through `compiled_block_loss` (for GPUs: on the CPU it
    measured slower than eager, docs/performance.md).
    """
    vocab = student_weight.shape[0]
    if teacher_hidden is not None:
        vocab = min(vocab, teacher_weight.shape[0])
    if vocab_size > 0:
        vocab = min(vocab, vocab_size)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, C)
    teacher = None
    if teacher_hidden is not None:
        teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])  # (N, C_t)
    if not torch.is_grad_enabled():  # evaluation (no_grad / inference_mode): no gradients to make
        hidden, student_weight = hidden.detach(), student_weight.detach()
    mm_dtype = student_weight.dtype
    if torch.is_autocast_enabled(hidden.device.type):
        mm_dtype = torch.get_autocast_dtype(hidden.device.type)
    chunk = min(chunk_tokens or auto_chunk_tokens(vocab, mm_dtype), hidden.shape[0])
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
        mm_dtype,
        compile_blocks,
    )
    return LossParts(loss=loss, kd=kd, ce=ce)
