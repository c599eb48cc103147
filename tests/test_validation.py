"""Validation scoring: blockwise CE, KL(teacher || student), top-1 agreement; nothing moved."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apr_cli.data.shards import ShardBatchSource, write_shard
from apr_cli.distill.backend import select_backend
from apr_cli.distill.evaluate import block_sums, window_indices
from apr_cli.distill.validation import Validator, format_eval
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import build_model


def tiny(vocab: int, hidden: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        torch_dtype="float32",
    )


def full_logit_reference(s_hidden, s_weight, labels, t_hidden, t_weight):
    """The same four sums from whole (N, V) logits, the way a reader would write them."""
    vocab = min(s_weight.shape[0], t_weight.shape[0])
    s_logits, t_logits = s_hidden @ s_weight.T, t_hidden @ t_weight.T
    s_logp = F.log_softmax(s_logits[:, :vocab].double(), -1)
    t_logp = F.log_softmax(t_logits[:, :vocab].double(), -1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum()
    agree = (s_logits[:, :vocab].argmax(-1) == t_logits[:, :vocab].argmax(-1)).sum()
    ce_s = F.cross_entropy(s_logits.double(), labels, reduction="sum")
    ce_t = F.cross_entropy(t_logits.double(), labels, reduction="sum")
    return torch.stack([ce_s, kl, agree.double(), ce_t])


@pytest.mark.parametrize("chunk", [0, 1, 7, 40])
def test_block_sums_match_full_logits_with_padded_vocabularies(chunk):
    gen = torch.Generator().manual_seed(0)
    n, vocab_s, vocab_t = 40, 50, 56  # the teacher has 6 padding rows more
    s_hidden, t_hidden = torch.randn(n, 8, generator=gen), torch.randn(n, 12, generator=gen)
    s_weight, t_weight = (
        torch.randn(vocab_s, 8, generator=gen),
        torch.randn(vocab_t, 12, generator=gen),
    )
    labels = torch.randint(0, vocab_s, (n,), generator=gen)
    got = block_sums(
        s_hidden, s_weight, labels, t_hidden, t_weight, teacher_loss=True, chunk_tokens=chunk
    )
    want = full_logit_reference(s_hidden, s_weight, labels, t_hidden, t_weight)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert 0 < got[2] < n  # some, not all, positions agree: the count means something


def test_a_model_agrees_with_itself():
    gen = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(30, 8, generator=gen), torch.randn(20, 8, generator=gen)
    labels = torch.randint(0, 20, (30,), generator=gen)
    sums = block_sums(hidden, weight, labels, hidden, weight, teacher_loss=True, chunk_tokens=4)
    assert sums[1].item() == pytest.approx(0.0, abs=1e-6) and sums[2].item() == 30
    assert sums[3].item() == pytest.approx(sums[0].item())


@pytest.fixture()
def val_source(tmp_path):
    ids = np.random.default_rng(0).integers(0, 48, 401)
    write_shard(tmp_path / "val.bin", ids)
    return ShardBatchSource(tmp_path, vocab_size=48)  # 25 windows of 16


def test_validator_scores_the_same_windows_and_leaves_rng_and_modes_alone(val_source):
    student, teacher = build_model(tiny(48, 16), seed=1), build_model(tiny(48, 32), seed=2)
    backend = select_backend("cpu")
    v = Validator(val_source, every=5, windows=10, seq_len=16, batch_size=3, backend=backend)
    assert v.picks == window_indices(25, 10)
    assert [s for s in range(1, 13) if v.due(s, 12)] == [5, 10, 12]
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    first = v.run(5, student, teacher, student)
    assert torch.equal(torch.get_rng_state(), rng_before) and student.training
    again = v.run(10, student, teacher, student)
    # Same windows, same model: the same scores; the teacher's loss is scored once.
    assert {k: again[k] for k in first if k != "step"} == {
        k: first[k] for k in first if k != "step"
    }
    assert v.teacher_loss is not None and first["val_loss"] > 0
    assert 0.0 <= first["top1_agreement"] <= 1.0 and first["kl_to_teacher"] > 0
    summary = v.summary()
    assert summary["best_step"] == 5 and summary["evals"] == 2
    assert summary["tokens"] == 10 * 16 and summary["final_val_loss"] == again["val_loss"]
    assert [(r["step"], r["val_loss"]) for r in v.history] == [
        (5, first["val_loss"]),
        (10, again["val_loss"]),
    ]
    line = format_eval(first, 12, v.teacher_loss)
    assert line.startswith(f"eval  5/12 val_loss={first['val_loss']:.4f} kl_to_teacher=")
    assert line.endswith(f"(teacher val_loss={v.teacher_loss:.4f})")


def test_validator_state_round_trips(val_source):
    student = build_model(tiny(48, 16), seed=1)
    backend = select_backend("cpu")
    v = Validator(val_source, every=2, windows=0, seq_len=16, batch_size=8, backend=backend)
    row = v.run(2, student, None, student)
    assert "kl_to_teacher" not in row and v.teacher_loss is None
    w = Validator(val_source, every=2, windows=0, seq_len=16, batch_size=8, backend=backend)
    w.load_state_dict(v.state_dict())
    assert w.history == v.history and w.summary() == v.summary()
