"""The KD loss against a direct, independently written formula (float64, per token)."""

import math

import pytest
import torch

from apr_cli.distill.losses import IGNORE_INDEX, kd_loss


def direct_loss(s, t, y, kind, T, alpha, beta=0.5):
    """The textbook formula, token by token, in float64."""
    s, t = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, t.shape[-1])
    y = y.reshape(-1)
    kd_sum, ce_sum, n = 0.0, 0.0, 0
    for i in range(s.shape[0]):
        if y[i] == IGNORE_INDEX:
            continue
        n += 1
        p = torch.softmax(t[i] / T, -1)  # teacher
        q = torch.softmax(s[i] / T, -1)  # student
        if kind == "forward-kl":
            kd = (p * (p / q).log()).sum()
        elif kind == "reverse-kl":
            kd = (q * (q / p).log()).sum()
        else:
            m = beta * p + (1 - beta) * q
            kd = beta * (p * (p / m).log()).sum() + (1 - beta) * (q * (q / m).log()).sum()
        kd_sum = kd_sum + kd
        ce_sum = ce_sum - torch.log_softmax(s[i], -1)[y[i]]
    kd, ce = kd_sum / n, ce_sum / n
    return alpha * T * T * kd + (1 - alpha) * ce, kd, ce


@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "jsd"])
@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (3.0, 0.7), (2.0, 0.0), (0.5, 1.0)])
def test_value_and_gradient_match_direct_formula(kind, T, alpha):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 11, generator=g) * 3
    t = torch.randn(2, 5, 11, generator=g) * 3
    y = torch.randint(0, 11, (2, 5), generator=g)
    y[0, 1] = IGNORE_INDEX
    s1 = s.clone().requires_grad_(True)
    parts = kd_loss(s1, t, y, kind=kind, temperature=T, alpha=alpha, beta=0.3)
    parts.loss.backward()
    s2 = s.double().requires_grad_(True)
    ref, ref_kd, ref_ce = direct_loss(s2, t, y, kind, T, alpha, beta=0.3)
    ref.backward()
    assert parts.loss.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    assert parts.kd.item() == pytest.approx(ref_kd.item(), rel=1e-5, abs=1e-6)
    assert parts.ce.item() == pytest.approx(ref_ce.item(), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(s1.grad.double(), s2.grad, rtol=1e-4, atol=1e-6)


def test_forward_and_reverse_kl_differ():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g) * 4
    y = torch.zeros(4, dtype=torch.long)
    fwd = kd_loss(s, t, y, kind="forward-kl", alpha=1.0).kd
    rev = kd_loss(s, t, y, kind="reverse-kl", alpha=1.0).kd
    assert not torch.isclose(fwd, rev)


def test_alpha_weighs_the_kd_term():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(3, 6, generator=g), torch.randn(3, 6, generator=g)
    y = torch.tensor([0, 1, 2])
    pure_kd = kd_loss(s, t, y, temperature=2.0, alpha=1.0)
    pure_ce = kd_loss(s, t, y, temperature=2.0, alpha=0.0)
    assert pure_kd.loss.item() == pytest.approx(4.0 * pure_kd.kd.item())
    assert pure_ce.loss.item() == pytest.approx(pure_ce.ce.item())


def test_identical_distributions_have_zero_kd():
    s = torch.randn(5, 9)
    y = torch.arange(5)
    for kind in ("forward-kl", "reverse-kl", "jsd"):
        assert kd_loss(s, s.clone(), y, kind=kind).kd.item() == pytest.approx(0.0, abs=1e-6)


def test_padding_rows_are_dropped_when_vocabularies_differ():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(4, 10, generator=g)
    t = torch.randn(4, 12, generator=g)  # teacher has two padding rows more
    y = torch.tensor([1, 2, 3, IGNORE_INDEX])
    aligned = kd_loss(s, t, y)
    trimmed = kd_loss(s, t[:, :10], y)
    assert aligned.loss.item() == pytest.approx(trimmed.loss.item())


def test_all_positions_count_not_only_the_last():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(1, 6, 8, generator=g, requires_grad=True)
    t = torch.randn(1, 6, 8, generator=g)
    kd_loss(s, t, torch.randint(0, 8, (1, 6), generator=g)).loss.backward()
    assert (s.grad.abs().sum(-1) > 0).all()


def test_no_teacher_is_cross_entropy():
    s = torch.randn(3, 5)
    y = torch.tensor([4, 0, 2])
    parts = kd_loss(s, None, y)
    expected = torch.nn.functional.cross_entropy(s, y).item()
    assert parts.loss.item() == pytest.approx(expected)
    assert parts.kd.item() == 0.0


def test_uniform_student_against_uniform_teacher_ce_is_log_vocab():
    s = torch.zeros(2, 16)
    parts = kd_loss(s, torch.zeros(2, 16), torch.tensor([3, 7]), alpha=0.0)
    assert parts.loss.item() == pytest.approx(math.log(16))
