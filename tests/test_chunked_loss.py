"""The chunked loss from hidden states against kd_loss on the full logits: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from apr_cli.distill.losses import (
    IGNORE_INDEX,
    auto_chunk_tokens,
    block_loss,
    distill_loss,
    kd_loss,
)

B, T, C, C_T = 3, 8, 16, 24  # N = 24 tokens


def inputs(v_s=40, v_t=40, seed=0):
    """Student hidden (B, T, C) and weight (V_s, C), teacher hidden and weight, labels (B, T)."""
    g = torch.Generator().manual_seed(seed)
    s_h = torch.randn(B, T, C, generator=g)
    s_w = torch.randn(v_s, C, generator=g) * 0.5
    t_h = torch.randn(B, T, C_T, generator=g)
    t_w = torch.randn(v_t, C_T, generator=g) * 0.5
    y = torch.randint(0, min(v_s, v_t), (B, T), generator=g)
    y[0, 2] = y[1, 0] = y[2, 7] = IGNORE_INDEX
    return s_h, s_w, t_h, t_w, y


def both(s_h, s_w, t_h, t_w, y, chunk, compile_blocks=False, **kw):
    """(parts, hidden grad, weight grad) from the chunked loss and from the direct formula."""
    out = []
    for chunked in (True, False):
        h, w = s_h.clone().requires_grad_(), s_w.clone().requires_grad_()
        if chunked:
            parts = distill_loss(
                h, w, t_h, t_w, y, chunk_tokens=chunk, compile_blocks=compile_blocks, **kw
            )
        else:
            t_logits = None if t_h is None else F.linear(t_h, t_w)
            parts = kd_loss(F.linear(h, w), t_logits, y, **kw)
        parts.loss.backward()
        out.append((parts, h.grad, w.grad))
    return out


def assert_same(chunked, direct):
    (pc, hc, wc), (pd, hd, wd) = chunked, direct
    for name in ("loss", "kd", "ce"):
        a, b = getattr(pc, name).item(), getattr(pd, name).item()
        assert a == pytest.approx(b, rel=1e-5, abs=1e-7), name
    torch.testing.assert_close(hc, hd, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(wc, wd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "jsd"])
@pytest.mark.parametrize("chunk", [1, 5, 7, 24, 100, 0])
def test_matches_direct_formula(kind, chunk):
    got = both(*inputs(), chunk, kind=kind, temperature=2.0, alpha=0.6, beta=0.3)
    assert_same(*got)


@pytest.mark.parametrize("v_s,v_t", [(40, 44), (44, 40)])
def test_vocab_mismatch_keeps_the_first_rows(v_s, v_t):
    chunked, direct = both(*inputs(v_s, v_t), 5)
    assert_same(chunked, direct)
    if v_s > v_t:  # student rows beyond the teacher's vocab take no part
        assert torch.all(chunked[2][v_t:] == 0)


def test_no_teacher_is_cross_entropy():
    s_h, s_w, _, _, y = inputs()
    chunked, direct = both(s_h, s_w, None, None, y, 5)
    assert_same(chunked, direct)
    assert chunked[0].kd.item() == 0.0


def test_all_ignored_gives_zero_loss_and_gradient():
    s_h, s_w, t_h, t_w, y = inputs()
    (parts, h_grad, w_grad), _ = both(s_h, s_w, t_h, t_w, torch.full_like(y, IGNORE_INDEX), 5)
    assert parts.loss.item() == 0.0
    assert h_grad.abs().sum() == 0 and w_grad.abs().sum() == 0


def test_tied_weight_sums_embedding_and_output_gradients():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (B, T), generator=g)
    y = torch.randint(0, 40, (B, T), generator=g)
    y[1, 3] = IGNORE_INDEX
    proj = torch.randn(C, C, generator=g) * 0.3
    t_h, t_w = torch.randn(B, T, C_T, generator=g), torch.randn(40, C_T, generator=g)
    grads = []
    for chunked in (True, False):
        embed = torch.nn.Embedding(40, C)
        embed.weight.data = torch.randn(40, C, generator=torch.Generator().manual_seed(2))
        hidden = torch.tanh(embed(ids) @ proj)  # (B, T, C): the weight feeds both ends
        if chunked:
            loss = distill_loss(hidden, embed.weight, t_h, t_w, y, chunk_tokens=7).loss
        else:
            loss = kd_loss(F.linear(hidden, embed.weight), F.linear(t_h, t_w), y).loss
        loss.backward()
        grads.append(embed.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_scales_by_the_upstream_gradient_and_kd_ce_carry_none():
    s_h, s_w, t_h, t_w, y = inputs()
    h = s_h.clone().requires_grad_()
    parts = distill_loss(h, s_w, t_h, t_w, y, chunk_tokens=5)
    assert not parts.kd.requires_grad and not parts.ce.requires_grad
    (parts.loss * 0.25).backward()
    (_, direct_h, _) = both(s_h, s_w, t_h, t_w, y, 5)[1]
    torch.testing.assert_close(h.grad, 0.25 * direct_h, rtol=1e-4, atol=1e-6)


def test_without_grad_gives_the_same_value():
    s_h, s_w, t_h, t_w, y = inputs()
    with torch.no_grad():
        value = distill_loss(s_h, s_w, t_h, t_w, y, chunk_tokens=5).loss
    expected = kd_loss(F.linear(s_h, s_w), F.linear(t_h, t_w), y).loss
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)


def test_bf16_autocast_computes_the_loss_in_fp32():
    s_h, s_w, t_h, t_w, y = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        chunked, direct = both(s_h, s_w, t_h, t_w, y, 5)
    assert chunked[0].loss.dtype == torch.float32
    assert chunked[1].dtype == s_h.dtype and chunked[2].dtype == s_w.dtype
    assert chunked[0].loss.item() == pytest.approx(direct[0].loss.item(), rel=1e-2)
    torch.testing.assert_close(chunked[2], direct[2], rtol=0.05, atol=0.02)


def test_auto_chunk_bounds_block_logits_and_grows_for_bf16():
    fp32, bf16 = auto_chunk_tokens(151936), auto_chunk_tokens(151936, torch.bfloat16)
    assert fp32 * 151936 * 4 <= 96 * 2**20 < (fp32 + 1) * 151936 * 4
    assert bf16 * 151936 * 4 <= 256 * 2**20 and bf16 > 2 * fp32
    assert auto_chunk_tokens(10**9) == 1


def test_padding_rows_past_the_real_vocab_change_nothing():
    """Qwen-style padding rows (never trained) must not reach either softmax or the gradient."""
    torch.manual_seed(0)
    real, rows, width = 48, 64, 16
    s_h, t_h = torch.randn(2, 5, width), torch.randn(2, 5, width)
    s_w = torch.randn(rows, width, requires_grad=True)
    y = torch.randint(0, real, (2, 5))
    quiet = torch.randn(rows, width)
    quiet[real:] = 0.0
    loud = quiet.clone()
    loud[real:] = 100.0 * t_h.reshape(-1, width).mean(0)  # huge teacher logits on padding rows
    losses = []
    for t_w in (quiet, loud):
        parts = distill_loss(s_h, s_w, t_h, t_w, y, vocab_size=real)
        (grad,) = torch.autograd.grad(parts.loss, s_w)
        assert torch.all(grad[real:] == 0)
        losses.append(parts.loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    assert distill_loss(s_h, s_w, t_h, loud, y).loss != losses[1]  # without it they leak in


@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "jsd"])
@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (3.0, 1.0), (0.5, 0.0)])
def test_closed_form_gradient_matches_autograd(kind, T, alpha):
    """block_loss's d loss / d logits against autograd through kd_loss, per token."""
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(6, 50, generator=g) * 4, torch.randn(6, 50, generator=g) * 4
    y = torch.randint(0, 50, (6,), generator=g)
    buffers = [torch.empty(6, 50) for _ in range(2)]
    grad, kd, ce = block_loss(s.clone(), t / T, buffers, y, kind, T, alpha, 0.3)
    for i in range(6):  # kd_loss of one token is that token's loss with weight 1
        logits = s[i : i + 1].clone().requires_grad_()
        parts = kd_loss(
            logits, t[i : i + 1], y[i : i + 1], kind=kind, temperature=T, alpha=alpha, beta=0.3
        )
        parts.loss.backward()
        assert kd[i].item() == pytest.approx(parts.kd.item(), rel=1e-5, abs=1e-6)
        assert ce[i].item() == pytest.approx(parts.ce.item(), rel=1e-5)
        torch.testing.assert_close(grad[i], logits.grad[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "jsd"])
def test_peaked_distributions_stay_finite_and_accurate(kind):
    """Logits ~1000 apart: probabilities underflow to 0; the result matches float64."""
    s_h, s_w, t_h, t_w, y = inputs()
    s_h, t_h = s_h * 30, t_h * 30
    h, w = s_h.clone().requires_grad_(), s_w.clone().requires_grad_()
    loss = distill_loss(h, w, t_h, t_w, y, chunk_tokens=5, kind=kind, temperature=1.0).loss
    loss.backward()
    h64, w64 = s_h.double().requires_grad_(), s_w.double().requires_grad_()
    t_logits = F.linear(t_h.double(), t_w.double())
    ref = kd_loss(F.linear(h64, w64), t_logits, y, kind=kind, temperature=1.0).loss
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for got, want in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert torch.isfinite(got).all()
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max()
