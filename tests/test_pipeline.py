"""The training loop on real tiny models: exact steps, accumulation, determinism, frozen teacher."""

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from apr_cli.data.source import SyntheticBatchSource
from apr_cli.distill.pipeline import Pipeline, TrainConfig, TrainingDiverged
from apr_cli.errors import AprError
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import build_model

CFG = ModelConfig.from_name("tiny-student").with_(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1
)


def models(seed=0):
    return build_model(CFG, seed=seed), build_model(CFG.with_(num_hidden_layers=2), seed=seed + 1)


class Recorder:
    def __init__(self):
        self.steps = []

    def on_step(self, m):
        self.steps.append(m)


def train(config, seed=0, source=None):
    student, teacher = models(seed)
    pipe = Pipeline(student, teacher, config, source)
    recorder = Recorder()
    result = pipe.train(recorder)
    return student, teacher, result, recorder


def test_runs_exactly_the_requested_steps():
    _, _, result, rec = train(TrainConfig(steps=7, batch_size=4, seq_len=8, warmup=2))
    assert result.steps == 7
    assert [m.step for m in rec.steps] == list(range(1, 8))
    assert result.tokens == 7 * 4 * 8


class RowStreamSource(SyntheticBatchSource):
    """Row k of the stream is random tokens seeded by k: micro-batches make up the full batch."""

    def __init__(self, vocab_size):
        super().__init__(vocab_size)
        self.row = 0

    def next_batch(self, batch_size, seq_len):
        rows = []
        for k in range(self.row, self.row + batch_size):
            g = torch.Generator().manual_seed(k)
            rows.append(torch.randint(0, self.vocab_size, (seq_len + 1,), generator=g))
        self.row += batch_size
        w = torch.stack(rows)  # (B, T + 1)
        return w[:, :-1], w[:, 1:]


def test_gradient_accumulation_equals_one_big_batch():
    # Compare gradients and losses: Adam turns float noise in exactly-zero gradients (the key
    # bias) into full-size steps, so weights after several steps are not a fair comparison.
    base = dict(steps=1, batch_size=8, seq_len=8, warmup=1)
    a, _, ra, _ = train(TrainConfig(**base, grad_accum=1), source=RowStreamSource(CFG.vocab_size))
    b, _, rb, _ = train(TrainConfig(**base, grad_accum=4), source=RowStreamSource(CFG.vocab_size))
    assert ra.final_loss == pytest.approx(rb.final_loss, rel=1e-5)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_same_seed_same_weights_bit_for_bit():
    config = TrainConfig(steps=4, batch_size=4, seq_len=8)
    a, *_ = train(config)
    b, *_ = train(config)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_teacher_stays_frozen_and_student_moves():
    student, teacher = models()
    before_t = {k: v.clone() for k, v in teacher.state_dict().items()}
    before_s = {k: v.clone() for k, v in student.state_dict().items()}
    Pipeline(student, teacher, TrainConfig(steps=3, batch_size=4, seq_len=8)).train()
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.training
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before_t[k])
    assert any(not torch.equal(v, before_s[k]) for k, v in student.state_dict().items())


def test_every_batch_comes_from_the_source():
    class CountingSource(SyntheticBatchSource):
        calls = []

        def next_batch(self, batch_size, seq_len):
            self.calls.append((batch_size, seq_len))
            return super().next_batch(batch_size, seq_len)

    source = CountingSource(CFG.vocab_size)
    train(TrainConfig(steps=3, batch_size=6, seq_len=5, grad_accum=3), source=source)
    assert source.calls == [(2, 5)] * 9


def test_with_batch_source_swaps_the_source():
    student, teacher = models()
    pipe = Pipeline(student, teacher, TrainConfig(steps=1, batch_size=2, seq_len=4))
    other = SyntheticBatchSource(3)
    assert pipe.with_batch_source(other) is pipe
    assert pipe.source is other


def test_without_teacher_the_loss_is_cross_entropy():
    student, _ = models()
    config = TrainConfig(steps=30, batch_size=4, seq_len=8, lr=1e-2)
    result = Pipeline(student, None, config).train()
    assert result.final_loss < 0.1 * result.initial_loss


def test_learning_rate_warms_up_then_decays_to_the_floor():
    c = TrainConfig(steps=20, lr=1e-3, warmup=5, min_lr_ratio=0.1)
    lrs = [c.lr_at(s) for s in range(20)]
    assert lrs[:5] == pytest.approx([2e-4, 4e-4, 6e-4, 8e-4, 1e-3])
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:]))
    assert lrs[-1] == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "change,flag",
    [
        ({"steps": 0}, "--steps"),
        ({"lr": 0.0}, "--lr"),
        ({"temperature": 0.0}, "--temperature"),
        ({"alpha": 1.5}, "--alpha"),
        ({"alpha": -0.1}, "--alpha"),
        ({"batch_size": 6, "grad_accum": 4}, "--batch-size"),
        ({"loss": "l2"}, "--loss"),
        ({"seq_len": 4096}, "--seq-len"),
    ],
)
def test_bad_settings_name_their_flag(change, flag):
    with pytest.raises(AprError, match=flag):
        TrainConfig(**change).validate(max_seq_len=2048)


def test_a_diverged_step_is_not_counted_as_completed():
    student, teacher = models()
    # An absurd learning rate blows the weights up after the first step.
    pipe = Pipeline(student, teacher, TrainConfig(steps=10, batch_size=4, seq_len=8, lr=1e30))
    with pytest.raises(TrainingDiverged) as e:
        pipe.train()
    assert pipe.step == len(pipe.losses) >= 1  # the manifest's steps_completed
    assert f"at step {pipe.step + 1};" in str(e.value)


def test_activation_checkpointing_changes_memory_not_results():
    config = TrainConfig(steps=2, batch_size=4, seq_len=8, warmup=1)
    plain, _, plain_result, _ = train(config, source=RowStreamSource(CFG.vocab_size))
    ckpt_config = TrainConfig(**{**config.to_dict(), "activation_checkpointing": True})
    ckpt, _, ckpt_result, _ = train(ckpt_config, source=RowStreamSource(CFG.vocab_size))
    assert all(isinstance(b, CheckpointWrapper) for b in ckpt.model.layers)
    assert ckpt_result.final_loss == plain_result.final_loss
    assert ckpt.state_dict().keys() == plain.state_dict().keys()  # saved checkpoints unchanged
    for name, t in plain.state_dict().items():
        torch.testing.assert_close(ckpt.state_dict()[name], t, rtol=0, atol=0, msg=name)
