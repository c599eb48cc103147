"""The teacher cache: what it stores, the top-k loss, resumable builds, refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from apr_cli.cli import app
from apr_cli.data.shards import ShardBatchSource, write_shard
from apr_cli.distill.losses import kd_loss
from apr_cli.distill.topk_loss import TopKTeacher, topk_distill_loss
from apr_cli.errors import AprError
from apr_cli.model.checkpoint import save_model
from apr_cli.model.config import PRESETS
from apr_cli.model.qwen2 import build_model
from apr_cli.teacher_cache.build import CRASH_AFTER_RECORDS
from apr_cli.teacher_cache.format import HEADER, shard_paths
from apr_cli.teacher_cache.reader import TeacherCache

SEQ_LEN = 16
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A saved tiny teacher and a two-file dataset (249 windows at SEQ_LEN)."""
    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    (root / "data").mkdir()
    write_shard(root / "data" / "a.bin", rng.integers(0, 512, 3000))
    write_shard(root / "data" / "b.bin", rng.integers(0, 512, 1000))
    save_model(build_model(PRESETS["tiny-teacher"], seed=1), root / "teacher")
    return root


def build_args(inputs, out, *extra):
    return ["teacher-cache", "build", "--teacher", str(inputs / "teacher"), "--dataset",
            str(inputs / "data"), "--seq-len", str(SEQ_LEN), "--out", str(out),
            "--device", "cpu", *map(str, extra)]  # fmt: skip


def cli(*args):
    return CliRunner().invoke(app, list(args))


def files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


# ---- the top-k loss ----


@pytest.mark.parametrize("kind", ["forward-kl", "reverse-kl", "jsd"])
def test_topk_loss_with_all_but_one_token_equals_the_full_loss(kind):
    """With K = V - 1 the tail bin is one token, so K + 1 bins are the whole distribution."""
    torch.manual_seed(0)
    V, C, T = 40, 8, 2.0
    hidden = torch.randn(2, 5, C, requires_grad=True)
    weight = torch.randn(V, C, requires_grad=True)
    t_logits = torch.randn(2, 5, V) * 3
    labels = torch.randint(0, V, (2, 5))
    labels[0, 0] = -100
    t_logp = F.log_softmax(t_logits / T, -1)
    top, ids = t_logp.topk(V - 1, -1)
    tail = t_logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    teacher = TopKTeacher(top, tail, ids, V)
    options = {"kind": kind, "temperature": T, "alpha": 0.6, "beta": 0.3}
    got = topk_distill_loss(hidden, weight, teacher, labels, chunk_tokens=3, **options)
    grads = torch.autograd.grad(got.loss, (hidden, weight))
    want = kd_loss(F.linear(hidden, weight), t_logits, labels, **options)
    want_grads = torch.autograd.grad(want.loss, (hidden, weight))
    for a, b in [
        (got.loss, want.loss),
        (got.kd, want.kd),
        (got.ce, want.ce),
        *zip(grads, want_grads),
    ]:
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_topk_loss_moves_teacher_tokens_the_student_lacks_into_the_tail():
    """A teacher with padding rows past the student's vocab: those ids count as 'the rest'."""
    torch.manual_seed(1)
    V, C = 30, 8
    hidden = torch.randn(1, 4, C, requires_grad=True)
    weight = torch.randn(V, C)
    logp = F.log_softmax(torch.randn(1, 4, V + 2) * 3, -1)
    logp[..., V:] = logp.max() + 1  # the padding rows are the teacher's top tokens
    logp = logp.log_softmax(-1)
    top, ids = logp.topk(V + 1, -1)  # every token but one, two of them outside the student's
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    got = topk_distill_loss(
        hidden, weight, TopKTeacher(top, tail, ids, V + 2), torch.zeros(1, 4, dtype=torch.long)
    )
    # The same as a teacher whose padding mass sits on the one token left out of the top-k.
    merged = logp[..., :V].clone()
    rest = torch.cat([tail[..., None], logp[..., V:]], -1).logsumexp(-1)
    left_out = logp[..., :V].argmin(-1, keepdim=True)
    merged.scatter_(-1, left_out, rest[..., None])
    want = kd_loss(F.linear(hidden, weight), merged * 3.0, torch.zeros(1, 4, dtype=torch.long))
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got.loss, hidden)
    assert torch.isfinite(grad).all()


# ---- building and reading ----


def test_hidden_cache_holds_the_teachers_final_hidden_states(inputs, tmp_path):
    out = tmp_path / "c"
    result = cli(*build_args(inputs, out, "--cache-dtype", "float32", "--windows", "3:40"))
    assert result.exit_code == 0, result.output
    cache = TeacherCache(out)
    teacher = build_model(PRESETS["tiny-teacher"], seed=1).eval()
    source = ShardBatchSource(inputs / "data")
    ks = [39, 3, 17]
    rows = torch.from_numpy(np.stack([source.window(k, SEQ_LEN)[:-1] for k in ks]).astype(np.int64))
    with torch.no_grad():
        want = teacher.hidden_states(rows)
    assert torch.equal(cache.read(ks), want)
    assert torch.equal(cache.output_weight(), teacher.output_weight.detach())
    report = cache.describe()
    assert report["bytes_per_token"] == 256 * 4 and report["windows"] == [3, 40]
    assert report["shards_done"] == report["shards"] == 1
    with pytest.raises(AprError, match="outside the cached 3..39"):
        cache.read([40])


def test_topk_cache_holds_the_largest_log_probs_and_the_tail(inputs, tmp_path):
    out = tmp_path / "c"
    result = cli(*build_args(inputs, out, "--kind", "topk", "--top-k", "8", "--temperature", "2"))
    assert result.exit_code == 0, result.output
    cache = TeacherCache(out)
    assert cache.describe()["bytes_per_token"] == 8 * 2 + 2 + 8 * 2  # vocab 512 fits uint16 ids
    teacher = build_model(PRESETS["tiny-teacher"], seed=1).eval()
    row = ShardBatchSource(inputs / "data").window(100, SEQ_LEN)[:-1]
    with torch.no_grad():
        logp = F.log_softmax(teacher(torch.from_numpy(row.astype(np.int64))[None]) / 2, -1)
    got = cache.read([100])
    top, ids = logp.topk(8, -1)
    assert torch.equal(got.ids, ids)
    torch.testing.assert_close(got.logp, top, rtol=1e-3, atol=1e-3)  # fp16
    rest = (1 - top.exp().sum(-1)).log()
    torch.testing.assert_close(got.tail, rest, rtol=1e-3, atol=1e-3)


def test_inspect_reports_and_json(inputs, tmp_path):
    out = tmp_path / "c"
    assert cli(*build_args(inputs, out, "--shard-windows", "100")).exit_code == 0
    result = cli("teacher-cache", "inspect", str(out), "--json", "--verify")
    report = json.loads(result.output)
    assert report["kind"] == "hidden" and report["seq_len"] == SEQ_LEN
    assert report["bytes_per_token"] == 256 * 2 and report["shards"] == 3
    assert report["dataset"]["fingerprint"]["files"] == [["a.bin", 12000], ["b.bin", 4000]]
    assert "files" in report["teacher"]["fingerprint"]
    text = cli("teacher-cache", "inspect", str(out)).output
    assert "bytes/token: 512" in text and "shards: 3/3 built" in text


# ---- resumable builds ----


def build_process(inputs, out, env=None):
    args = build_args(inputs, out, "--kind", "topk", "--shard-windows", "20", "--batch-size", "4")
    command = [sys.executable, "-m", "apr_cli", *args]
    env = {**ENV, **(env or {})}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


@pytest.fixture(scope="module")
def reference_build(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "cache"
    proc = build_process(inputs, out)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    return files(out)


@pytest.mark.slow
@pytest.mark.parametrize("after", [1, 6, 12])
def test_build_killed_after_progress_resumes_byte_identical(
    inputs, tmp_path, reference_build, after
):
    """SIGKILL once `after` shards are reported, wherever the process is; run the same command."""
    out = tmp_path / "cache"
    proc = build_process(inputs, out)
    for n, _ in enumerate(proc.stderr, start=1):
        if n == after:
            proc.kill()
            break
    proc.wait()
    assert proc.returncode == -9
    assert files(out) != reference_build
    proc = build_process(inputs, out)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert f"({after}/13)" in err and "already built" in err
    assert files(out) == reference_build


@pytest.mark.slow
def test_build_killed_between_records_and_index_resumes_byte_identical(
    inputs, tmp_path, reference_build
):
    """The records of shard 4 are in place, its index entry is not: it is rebuilt, not trusted."""
    out = tmp_path / "cache"
    proc = build_process(inputs, out, {CRASH_AFTER_RECORDS: "4"})
    proc.communicate(timeout=900)
    assert proc.returncode == -9
    bin_path, entry = shard_paths(out, 4)
    assert bin_path.is_file() and not entry.exists()
    bin_path.write_bytes(bin_path.read_bytes()[:-7])  # and a torn file left behind, too
    (out / "shards" / ".000005.bin.x.tmp").write_bytes(b"partial")
    proc = build_process(inputs, out)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err
    assert "shard 4 written" in err and "shard 3 already built" in err
    assert files(out) == reference_build


def test_build_refuses_to_continue_a_cache_built_differently(inputs, tmp_path):
    out = tmp_path / "c"
    assert cli(*build_args(inputs, out, "--windows", "0:30")).exit_code == 0
    before = files(out)
    result = cli(*build_args(inputs, out, "--windows", "0:31"))
    assert result.exit_code == 2
    assert "built differently (windows differ)" in result.output
    assert files(out) == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--windows", "5:500"], "--windows '5:500': expected A:B with 0 <= A < B <= 249"),
        (["--kind", "logits"], "--kind must be one of hidden, topk"),
        (["--kind", "topk", "--top-k", "512"], "--top-k 512 must be below the teacher's vocab"),
        (["--cache-dtype", "fp8"], "--cache-dtype must be one of bf16, float32"),
    ],
)
def test_build_refuses_bad_options_in_one_line(inputs, tmp_path, args, needle):
    result = cli(*build_args(inputs, tmp_path / "c", *args))
    assert result.exit_code == 2
    assert needle in result.output and "Traceback" not in result.output
    assert not (tmp_path / "c").exists()


# ---- damaged caches ----


@pytest.fixture
def built(inputs, tmp_path):
    out = tmp_path / "c"
    assert cli(*build_args(inputs, out, "--shard-windows", "100")).exit_code == 0
    return out


def test_truncated_shard_is_refused(built):
    bin_path, _ = shard_paths(built, 1)
    bin_path.write_bytes(bin_path.read_bytes()[:-2])
    with pytest.raises(AprError, match="shard 1 000001.bin has 819198 bytes, expected 819200"):
        TeacherCache(built)


def test_edited_shard_is_refused(built):
    bin_path, _ = shard_paths(built, 2)
    data = bytearray(bin_path.read_bytes())
    data[10] ^= 1
    bin_path.write_bytes(bytes(data))
    with pytest.raises(AprError, match="000002.bin does not match its sha256"):
        TeacherCache(built)


def test_edited_header_is_refused(built):
    header = json.loads((built / HEADER).read_text())
    header["layout"]["seq_len"] = 32
    (built / HEADER).write_text(json.dumps(header))
    result = cli("teacher-cache", "inspect", str(built))
    assert result.exit_code == 2 and "checksum mismatch" in result.output


def test_unfinished_cache_is_refused_for_use(built):
    shard_paths(built, 0)[1].unlink()
    with pytest.raises(AprError, match="shard 0 missing"):
        TeacherCache(built)
    assert "shards: 2/3 built (unfinished" in cli("teacher-cache", "inspect", str(built)).output


# ---- window keys ----


@pytest.mark.parametrize("shuffle", [False, True])
def test_batch_windows_are_the_windows_next_batch_reads(inputs, shuffle):
    """Over several epochs, for each of two ranks: the cache key of every row is its window."""
    for rank in range(2):
        source = ShardBatchSource(inputs / "data", shuffle=shuffle, seed=3, rank=rank, world_size=2)
        for _ in range(40):  # 40 batches of 7 rows x 2 ranks: past two epochs of 249 windows
            ks = source.batch_windows(7, SEQ_LEN)
            got, _ = source.next_batch(7, SEQ_LEN)
            want = np.stack([source.window(k, SEQ_LEN)[:-1] for k in ks])
            assert np.array_equal(got.numpy(), want)


@pytest.mark.parametrize("shuffle", [False, True])
def test_windows_needed_bounds_every_window_a_run_reads(inputs, shuffle):
    for count in (10, 100, 249, 300):
        source = ShardBatchSource(inputs / "data", shuffle=shuffle, seed=1)
        source.next_batch(50, SEQ_LEN)  # start mid-epoch
        lo, hi = source.windows_needed(count, SEQ_LEN)
        seen = []
        for _ in range(count // 10):
            seen += source.batch_windows(10, SEQ_LEN)
            source.next_batch(10, SEQ_LEN)
        assert lo <= min(seen) and max(seen) <= hi
        if not shuffle and count == 10:
            assert (lo, hi) == (50, 59)


@pytest.mark.slow
def test_two_ranks_build_stripes_of_the_same_cache(inputs, tmp_path, reference_build):
    """Under torchrun each rank builds every other shard; the bytes equal one process's."""
    out = tmp_path / "cache"
    args = build_args(inputs, out, "--kind", "topk", "--shard-windows", "20", "--batch-size", "4")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "apr_cli", *args]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert files(out) == reference_build
