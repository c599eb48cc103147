"""The BatchSource protocol and the synthetic source."""

import pytest
import torch

from apr_cli.data.shards import ShardBatchSource, write_shard
from apr_cli.data.source import BatchSource, SyntheticBatchSource
from apr_cli.errors import AprError


def test_synthetic_shapes_and_dtype():
    inputs, labels = SyntheticBatchSource(11).next_batch(4, 9)
    assert inputs.shape == labels.shape == (4, 9)
    assert inputs.dtype == labels.dtype == torch.int64


def test_synthetic_rows_wrap_modulo_vocab():
    inputs, labels = SyntheticBatchSource(3).next_batch(7, 5)
    assert inputs[:, 0].tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert torch.equal(inputs, inputs[:, :1].expand(7, 5))
    assert torch.equal(labels, inputs)


def test_synthetic_is_stateless_and_reset_is_a_noop():
    source = SyntheticBatchSource(5)
    first = source.next_batch(3, 4)
    source.reset()
    source.load_state_dict(source.state_dict())
    again = source.next_batch(3, 4)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert source.describe() == {"kind": "synthetic", "vocab_size": 5}


def test_synthetic_rejects_empty_vocab():
    with pytest.raises(AprError, match="vocab_size"):
        SyntheticBatchSource(0)


def test_both_sources_satisfy_the_protocol(tmp_path):
    write_shard(tmp_path / "a.bin", range(20))
    assert isinstance(SyntheticBatchSource(3), BatchSource)
    assert isinstance(ShardBatchSource(tmp_path), BatchSource)
