"""ShardBatchSource: windows, wrap, file order, llm.c headers, ranks, resume, validation."""

from collections import Counter

import numpy as np
import pytest
import torch

from apr_cli.data import shards
from apr_cli.data.shards import ShardBatchSource, inspect_shards, write_shard
from apr_cli.errors import AprError


def corpus(tmp_path, n=200, vocab=1000, seed=0):
    """One raw shard of n random ids; returns the ids."""
    ids = np.random.default_rng(seed).integers(0, vocab, n)
    write_shard(tmp_path / "data.bin", ids)
    return ids


def write_llmc(path, tokens, magic, version, dtype):
    header = np.zeros(256, dtype="<i4")
    header[:3] = magic, version, len(tokens)
    with open(path, "wb") as f:
        header.tofile(f)
        np.asarray(tokens, dtype=dtype).tofile(f)


def rows(source, batch_size, seq_len):
    """The batch as a list of window tuples (inputs plus the last label)."""
    inputs, labels = source.next_batch(batch_size, seq_len)
    return [tuple(i) + (lab[-1],) for i, lab in zip(inputs.tolist(), labels.tolist(), strict=True)]


def test_windows_equal_corpus_slices(tmp_path):
    ids = corpus(tmp_path)
    source = ShardBatchSource(tmp_path)
    for step in range(3):
        inputs, labels = source.next_batch(4, 7)
        assert inputs.shape == labels.shape == (4, 7)
        assert inputs.dtype == labels.dtype == torch.int64
        for r in range(4):
            start = (step * 4 + r) * 7  # stride seq_len: windows share their boundary token
            assert inputs[r].tolist() == ids[start : start + 7].tolist()
            assert labels[r].tolist() == ids[start + 1 : start + 8].tolist()


def test_wraps_to_the_start_after_the_last_window(tmp_path):
    ids = corpus(tmp_path, n=50)
    source = ShardBatchSource(tmp_path)
    assert source.windows_per_epoch(7) == 7  # (50 - 1) // 7
    starts = [row[0] for _ in range(3) for row in rows(source, 3, 7)]
    assert starts == [ids[k * 7] for k in [0, 1, 2, 3, 4, 5, 6, 0, 1]]


def test_no_wrap_raises_end_of_data(tmp_path):
    corpus(tmp_path, n=50)
    source = ShardBatchSource(tmp_path, wrap=False)
    source.next_batch(3, 7)
    source.next_batch(3, 7)
    with pytest.raises(AprError, match="end of data") as e:
        source.next_batch(3, 7)
    assert str(tmp_path) in str(e.value)


def test_files_are_read_in_lexical_order_as_one_stream(tmp_path):
    parts = {"b.bin": [7, 8, 9], "10.bin": [1, 2], "a.bin": [5, 6], "9.bin": [3, 4], "x.txt": []}
    for name, ids in parts.items():
        write_shard(tmp_path / name, ids)
    (tmp_path / "empty.bin").write_bytes(b"")
    source = ShardBatchSource(tmp_path)
    assert source.tokens == 9
    assert source.describe()["files"] == 5  # .txt ignored, the empty .bin counted
    inputs, labels = source.next_batch(2, 4)  # both windows cross file boundaries
    assert inputs.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert labels.tolist() == [[2, 3, 4, 5], [6, 7, 8, 9]]


@pytest.mark.parametrize(
    "magic,version,dtype,width", [(20240520, 1, "<u2", 2), (20240801, 7, "<u4", 4)]
)
def test_llmc_headers_are_recognised(tmp_path, magic, version, dtype, width):
    ids = np.arange(30) * 1000 + 1
    write_llmc(tmp_path / "shard_000.bin", ids[:17], magic, version, dtype)
    write_llmc(tmp_path / "shard_001.bin", ids[17:], magic, version, dtype)
    source = ShardBatchSource(tmp_path, vocab_size=30_000)
    assert source.describe()["token_width"] == width
    assert source.tokens == 30
    inputs, labels = source.next_batch(2, 9)
    assert inputs.tolist() == [ids[:9].tolist(), ids[9:18].tolist()]
    assert labels[1].tolist() == ids[10:19].tolist()
    assert inspect_shards(tmp_path)["files"][0]["format"] == f"llm.c v{version}"


def test_llmc_and_raw_shards_mix(tmp_path):
    write_llmc(tmp_path / "a.bin", [1, 2, 3], 20240520, 1, "<u2")
    write_shard(tmp_path / "b.bin", [4, 5, 6])
    source = ShardBatchSource(tmp_path)
    assert source.next_batch(1, 5)[0].tolist() == [[1, 2, 3, 4, 5]]
    assert source.describe()["token_width"] == [2, 4]


def test_llmc_bad_version_and_truncation(tmp_path):
    write_llmc(tmp_path / "a.bin", range(10), 20240520, 3, "<u2")
    with pytest.raises(AprError, match=r"a\.bin: llm.c magic 20240520 with version 3"):
        ShardBatchSource(tmp_path)
    write_llmc(tmp_path / "a.bin", range(10), 20240801, 7, "<u4")
    with open(tmp_path / "a.bin", "r+b") as f:
        f.truncate(1024 + 9 * 4)
    with pytest.raises(AprError, match=r"a\.bin: llm.c header says 10 tokens"):
        ShardBatchSource(tmp_path)


@pytest.mark.parametrize("shuffle", [False, True])
def test_ranks_get_disjoint_rows_whose_union_is_the_single_rank_batch(tmp_path, shuffle):
    write_shard(tmp_path / "a.bin", np.arange(500))  # unique ids, so windows are distinct
    world, b, seq = 3, 2, 5
    single = ShardBatchSource(tmp_path, shuffle=shuffle, seed=4)
    ranks = [
        ShardBatchSource(tmp_path, rank=r, world_size=world, shuffle=shuffle, seed=4)
        for r in range(world)
    ]
    for _ in range(25):  # 25 * 6 windows pass the 99-window epoch boundary
        full = rows(single, b * world, seq)
        per_rank = [rows(s, b, seq) for s in ranks]
        assert sum((Counter(p) for p in per_rank), Counter()) == Counter(full)
        for r, p in enumerate(per_rank):
            assert p == full[r::world]  # rank r takes rows r, r+W, ...


def test_shuffle_visits_every_window_once_per_epoch(tmp_path):
    write_shard(tmp_path / "a.bin", np.arange(61))
    source = ShardBatchSource(tmp_path, shuffle=True, seed=1)
    epoch = [row[0] for row in rows(source, 12, 5)]  # 60 // 5 = 12 windows
    assert epoch != sorted(epoch)
    assert sorted(epoch) == list(range(0, 60, 5))
    assert [row[0] for row in rows(source, 12, 5)] != epoch  # a new order each epoch
    other = ShardBatchSource(tmp_path, shuffle=True, seed=2)
    assert [row[0] for row in rows(other, 12, 5)] != epoch


@pytest.mark.parametrize("shuffle", [False, True])
def test_restored_state_gives_identical_next_batches(tmp_path, shuffle):
    corpus(tmp_path, n=300)
    kwargs = {"shuffle": shuffle, "seed": 3, "rank": 1, "world_size": 2}
    source = ShardBatchSource(tmp_path, **kwargs)
    for _ in range(5):
        source.next_batch(3, 8)
    state = source.state_dict()
    expected = [source.next_batch(3, 8) for _ in range(6)]  # crosses the 37-window epoch end
    restored = ShardBatchSource(tmp_path, **kwargs)
    restored.load_state_dict(state)
    for want, got in zip(expected, (restored.next_batch(3, 8) for _ in range(6)), strict=True):
        assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])


def test_reset_goes_back_to_the_first_batch(tmp_path):
    corpus(tmp_path)
    source = ShardBatchSource(tmp_path, shuffle=True)
    first = source.next_batch(2, 6)[0]
    source.next_batch(2, 6)
    source.reset()
    assert torch.equal(source.next_batch(2, 6)[0], first)
    source.reset()
    inputs = source.next_batch(9, 20)[0]  # seq_len may change after reset: a new permutation
    assert sorted(inputs[:, 0].tolist()) == sorted(source.files[0].tokens[0:180:20].tolist())


def test_load_state_rejects_a_different_dataset_or_order(tmp_path):
    corpus(tmp_path)
    state = ShardBatchSource(tmp_path).state_dict()
    with pytest.raises(AprError, match="shuffle=False seed=0"):
        ShardBatchSource(tmp_path, shuffle=True).load_state_dict(state)
    corpus(tmp_path, n=100)
    with pytest.raises(AprError, match="dataset has 100 tokens"):
        ShardBatchSource(tmp_path).load_state_dict(state)
    with pytest.raises(AprError, match="not shards"):
        ShardBatchSource(tmp_path).load_state_dict({})


def test_describe(tmp_path):
    corpus(tmp_path, n=101)
    (tmp_path / "meta.json").write_text('{"vocab_size": 1000, "tokenizer": "bytes"}')
    source = ShardBatchSource(tmp_path)
    info = source.describe()
    assert info["kind"] == "shards" and info["path"] == str(tmp_path.resolve())
    assert (info["files"], info["tokens"], info["token_width"]) == (1, 101, 4)
    assert (info["vocab_size"], info["tokenizer"]) == (1000, "bytes")  # from meta.json
    assert "windows_per_epoch" not in info
    source.next_batch(1, 10)
    assert source.describe()["windows_per_epoch"] == 10


def test_error_missing_dir(tmp_path):
    with pytest.raises(AprError, match="nope: no such dataset directory"):
        ShardBatchSource(tmp_path / "nope")


def test_error_no_bin_files_points_at_split_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(AprError, match="no .bin shard files$"):
        ShardBatchSource(tmp_path)
    (tmp_path / "train").mkdir()
    write_shard(tmp_path / "train" / "a.bin", [1, 2])
    with pytest.raises(AprError, match="subdirectories train have some"):
        ShardBatchSource(tmp_path)


def test_error_size_not_a_multiple_of_the_token_width(tmp_path):
    write_shard(tmp_path / "a.bin", [1, 2, 3])
    (tmp_path / "b.bin").write_bytes(b"\x01\x00\x00\x00\x02\x00")
    with pytest.raises(AprError, match=r"b\.bin: size 6 bytes is not a multiple of the 4-byte"):
        ShardBatchSource(tmp_path)


def test_error_corpus_shorter_than_one_window(tmp_path):
    write_shard(tmp_path / "a.bin", range(8))
    source = ShardBatchSource(tmp_path)
    assert source.next_batch(1, 7)[0].shape == (1, 7)  # exactly one window of 8 fits
    source.reset()
    with pytest.raises(AprError, match="8 tokens is shorter than one window of seq_len \\+ 1 = 9"):
        source.next_batch(1, 8)
    (tmp_path / "a.bin").write_bytes(b"")
    with pytest.raises(AprError, match="hold no tokens"):
        ShardBatchSource(tmp_path)


def test_error_token_id_beyond_vocab_names_file_and_offset(tmp_path, monkeypatch):
    monkeypatch.setattr(shards, "SCAN_CHUNK", 16)  # so the bad id sits past a chunk boundary
    write_shard(tmp_path / "a.bin", np.full(40, 5))
    ids = np.full(50, 9)
    ids[37] = 10
    write_shard(tmp_path / "b.bin", ids)
    assert ShardBatchSource(tmp_path, vocab_size=11).tokens == 90
    with pytest.raises(
        AprError, match=r"b\.bin: token id 10 at token offset 37 is >= vocab size 10"
    ):
        ShardBatchSource(tmp_path, vocab_size=10)


def test_error_bad_arguments(tmp_path):
    corpus(tmp_path)
    with pytest.raises(AprError, match="rank 2 and world size 2"):
        ShardBatchSource(tmp_path, rank=2, world_size=2)
    with pytest.raises(AprError, match="vocab size must be positive"):
        ShardBatchSource(tmp_path, vocab_size=0)
    source = ShardBatchSource(tmp_path)
    with pytest.raises(AprError, match="must be positive"):
        source.next_batch(0, 4)
    source.next_batch(1, 4)
    with pytest.raises(AprError, match="seq_len 5 differs from 4"):
        source.next_batch(1, 5)


def test_write_shard_rejects_ids_outside_uint32(tmp_path):
    with pytest.raises(AprError, match="fit in uint32"):
        write_shard(tmp_path / "a.bin", [-1, 2])


def test_inspect_reports_range_and_vocab_check(tmp_path):
    write_shard(tmp_path / "a.bin", [3, 9, 4])
    report = inspect_shards(tmp_path, vocab_size=10)
    assert (report["tokens"], report["min_id"], report["max_id"]) == (3, 3, 9)
    assert report["vocab_check"] == "ok"
    report = inspect_shards(tmp_path, vocab_size=9)
    assert report["vocab_check"] == "failed"
    assert "a.bin: token id 9 at token offset 1" in report["vocab_error"]
    assert inspect_shards(tmp_path)["vocab_check"] == "skipped"
