"""Tokenizers, the shard builder and the `apr shards` commands, end to end on tiny text."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from apr_cli.cli import app
from apr_cli.data.build import build_shards, collect_inputs, is_val
from apr_cli.data.shards import ShardBatchSource, inspect_shards
from apr_cli.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe
from apr_cli.errors import AprError

TEXTS = {
    "a.txt": "héllo wörld ✓\nsecond line\n",
    "code/b.py": "def f(x):\n    return x + 1\n",
    "code/c.md": "# notes\n\nsome *markdown*\n",
    "code/.hidden.txt": "never read",
    "d.txt": "short",
    "e.txt": "",
}
RECORDS = [{"text": "json one"}, {"text": "json two ✓", "id": 2}, {"text": "json three"}]


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    for name, text in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "code" / "logo.png").write_bytes(b"\x89PNG\0\0binary")
    lines = [json.dumps(r) for r in RECORDS]
    (root / "docs.jsonl").write_text(lines[0] + "\n\n" + "\n".join(lines[1:]) + "\n")
    return root


def documents_of(folder, tokenizer):
    """Decode every document in a shard folder by reading it back through ShardBatchSource."""
    source = ShardBatchSource(folder)
    ids = source.next_batch(1, source.tokens - 1)[1][0].tolist()  # one window: all but token 0
    ids = [int(source.files[0].tokens[0])] + ids
    docs, current = [], []
    for i in ids:
        if i == tokenizer.eos_id:
            docs.append(tokenizer.decode(current))
            current = []
        else:
            current.append(i)
    assert current == []  # the stream ends with EOS
    return docs


def build(src, out, **kwargs):
    inputs = [str(src / "a.txt"), str(src / "code"), str(src / "*.jsonl"), str(src / "d.txt")]
    kwargs.setdefault("tokenizer", "bytes")
    return build_shards(inputs, collect_inputs(inputs), out, **kwargs)


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("bytes")
    assert (tok.name, tok.vocab_size, tok.eos_id) == ("bytes", 257, 256)
    ids = tok.encode("héllo ✓")
    assert max(ids) < 256 and tok.decode(ids) == "héllo ✓"
    assert tok.decode([104, 105, 256, 300]) == "hi<|endoftext|>\ufffd"


def test_train_bpe_round_trip_and_reload(tmp_path):
    texts = ["def add(a, b):\n    return a + b\n"] * 20 + ["héllo wörld ✓"]
    tok = train_bpe(iter(texts), 300, tmp_path / "tokenizer.json")
    assert tok.vocab_size <= 300 and tok.eos_id is not None
    ids = tok.encode("def add(x): return ✓ unseen")
    assert len(ids) < len("def add(x): return ✓ unseen".encode())  # merges were learned
    assert tok.decode(ids) == "def add(x): return ✓ unseen"
    again = load_tokenizer(tmp_path)  # a folder holding tokenizer.json works too
    assert again.encode("return a + b") == tok.encode("return a + b")
    assert again.name == str((tmp_path / "tokenizer.json").resolve())


def test_tokenizer_errors(tmp_path):
    with pytest.raises(AprError, match="nope.json: not found"):
        load_tokenizer(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AprError, match="bad.json: cannot load tokenizer"):
        load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(AprError, match="at least 257"):
        train_bpe(["x"], 100, tmp_path / "t.json")


def test_collect_inputs_order_and_filters(src):
    files = collect_inputs([str(src / "d.txt"), str(src), str(src / "*.txt")])
    names = [f.path.relative_to(src).as_posix() for f in files]
    walked = ["a.txt", "code/b.py", "code/c.md", "code/logo.png", "docs.jsonl", "e.txt"]
    assert names == ["d.txt", *walked]  # each file once, hidden ones skipped
    assert [f.named for f in files][:2] == [True, False]


def test_val_split_is_by_document_and_spread_evenly():
    val = [i for i in range(40) if is_val(i, 0.1)]
    assert val == [9, 19, 29, 39]
    assert not any(is_val(i, 0.0) for i in range(100))


def test_build_then_batches_reproduce_the_text(src, tmp_path):
    summary = build(src, tmp_path / "out", val_fraction=0.25)
    tok = ByteTokenizer()
    report = inspect_shards(tmp_path / "out" / "train", tokenizer=tok, sample=6)
    assert report["vocab_check"] == "ok" and report["sample"] == TEXTS["a.txt"][:5]  # é: 2 bytes
    train = documents_of(tmp_path / "out" / "train", tok)
    val = documents_of(tmp_path / "out" / "val", tok)
    # Inputs in order: a.txt, code/b.py, code/c.md, docs.jsonl (3 records), d.txt; e.txt is empty
    # and unnamed. Document 3 of 0..6 goes to val with fraction 0.25 (and 7 would be the next).
    originals = [TEXTS["a.txt"], TEXTS["code/b.py"], TEXTS["code/c.md"]]
    originals += [r["text"] for r in RECORDS] + [TEXTS["d.txt"]]
    assert val == [originals[3]]
    assert train == originals[:3] + originals[4:]
    meta = json.loads((tmp_path / "out" / "train" / "meta.json").read_text())
    assert meta["tokenizer"] == "bytes" and meta["vocab_size"] == 257 and meta["eos_id"] == 256
    assert meta["tokens"] == sum(len(t.encode()) + 1 for t in train)
    assert (meta["documents"], meta["skipped_binary_files"]) == (6, 1)
    assert summary["splits"]["val"]["documents"] == 1


def test_build_with_trained_bpe_is_deterministic_and_self_contained(src, tmp_path):
    build(src, tmp_path / "one", tokenizer=None, train_bpe_vocab=290, shard_tokens=16)
    build(src, tmp_path / "two", tokenizer=None, train_bpe_vocab=290, shard_tokens=16)
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*"))
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*"))
    assert one == two and len(list((tmp_path / "one" / "train").glob("*.bin"))) > 2
    for rel in one:
        if (tmp_path / "one" / rel).is_file():
            assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes()
    folder = tmp_path / "one" / "train"
    meta = json.loads((folder / "meta.json").read_text())
    tok = load_tokenizer(meta["tokenizer"], base=folder)
    assert documents_of(folder, tok)[0] == TEXTS["a.txt"]


def test_build_with_a_tokenizer_json_copies_it(src, tmp_path):
    train_bpe([TEXTS["a.txt"]], 270, tmp_path / "tok.json")
    build(src, tmp_path / "out", tokenizer=str(tmp_path / "tok.json"), val_fraction=0)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        tmp_path / "tok.json"
    ).read_bytes()
    assert not (tmp_path / "out" / "val").exists()


def test_failed_build_leaves_nothing_behind(src, tmp_path):
    (src / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(AprError, match=r"bad\.jsonl:2: no string field 'text'"):
        build_shards([str(src)], collect_inputs([str(src)]), tmp_path / "out", "bytes")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_build_input_errors(src, tmp_path):
    with pytest.raises(AprError, match="missing.txt: no such file"):
        collect_inputs([str(src / "missing.txt")])
    with pytest.raises(AprError, match="matches no files"):
        collect_inputs([str(src / "*.csv")])
    with pytest.raises(AprError, match=r"logo\.png: not UTF-8 text"):
        build_shards(
            ["x"], collect_inputs([str(src / "code" / "logo.png")]), tmp_path / "o", "bytes"
        )
    (src / "broken.jsonl").write_text("{oops\n")
    with pytest.raises(AprError, match=r"broken\.jsonl:1: invalid JSON"):
        build_shards(["x"], collect_inputs([str(src / "broken.jsonl")]), tmp_path / "o", "bytes")
    with pytest.raises(AprError, match="no text"):
        build_shards(["x"], collect_inputs([str(src / "e.txt")]), tmp_path / "o", "bytes")
    files = collect_inputs([str(src / "a.txt")])
    with pytest.raises(AprError, match="exactly one of --tokenizer and --train-bpe"):
        build_shards(["x"], files, tmp_path / "o", "bytes", train_bpe_vocab=300)
    with pytest.raises(AprError, match="--val-fraction 1.0"):
        build_shards(["x"], files, tmp_path / "o", "bytes", val_fraction=1.0)


def test_build_refuses_a_non_empty_out_without_force(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(AprError, match="not empty .pass --force"):
        build(src, out)
    build(src, out, force=True, val_fraction=0.5)
    assert sorted(p.name for p in out.iterdir()) == ["train", "val"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


runner = CliRunner()


def test_cli_build_and_inspect(src, tmp_path):
    out = tmp_path / "out"
    argv = ["shards", "build", str(src), "--out", str(out), "--tokenizer", "bytes"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert "train:" in result.stdout and "skipped 1 binary files" in result.stdout
    result = runner.invoke(app, ["shards", "inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "vocab check (< 257): ok" in result.stdout and "héllo wörld" in result.stdout
    result = runner.invoke(
        app, ["shards", "inspect", str(out / "train"), "--json", "--sample", "5"]
    )
    report = json.loads(result.stdout)
    assert report["sample"] == "héll" and report["max_id"] == 256  # é is two bytes


def test_cli_build_shows_a_byte_bar_per_pass_on_a_terminal_only(src, tmp_path):
    argv = ["shards", "build", str(src), "--train-bpe", "300", "--out"]
    piped = runner.invoke(app, [*argv, str(tmp_path / "piped")])
    assert piped.exit_code == 0, piped.output
    assert piped.stderr == ""
    # TTY_COMPATIBLE=1 is what rich, hence every bar of apr's, takes for a terminal (it has to
    # be set when the process starts: rich decides whether to redraw when its console is made).
    shown = subprocess.run(
        [sys.executable, "-m", "apr_cli", *argv, str(tmp_path / "shown")],
        capture_output=True,
        text=True,
        env={**os.environ, "TTY_COMPATIBLE": "1"},
    )
    assert shown.returncode == 0, shown.stderr
    total = sum(f.path.stat().st_size for f in collect_inputs([str(src)]))
    for phase in ("training tokenizer", "tokenizing"):  # one line per pass over the input
        assert f"{phase} " in shown.stderr
    assert f"{total}/{total} bytes" in shown.stderr


def test_cli_inspect_vocab_failure_exits_1_with_one_line(src, tmp_path):
    out = tmp_path / "out"
    runner.invoke(app, ["shards", "build", str(src), "--out", str(out), "--tokenizer", "bytes"])
    result = runner.invoke(app, ["shards", "inspect", str(out / "train"), "--vocab-size", "200"])
    assert result.exit_code == 1
    assert "vocab check (< 200): failed" in result.stdout
    error = result.stderr.strip()
    assert error.startswith("error:") and "\n" not in error and "Traceback" not in error
    # "héllo wörld ✓": the first byte >= 200 is the 0xE2 (226) starting ✓, 14 bytes in.
    assert "train_000000.bin: token id 226 at token offset 14 is >= vocab size 200" in error


@pytest.mark.parametrize(
    "args,message",
    [
        (["build", "{tmp}/none.txt", "--out", "{tmp}/o", "--tokenizer", "bytes"], "no such file"),
        (["build", "{src}", "--out", "{tmp}/o", "--tokenizer", "{tmp}/t.json"], "not found"),
        (["build", "{src}", "--out", "{tmp}/o"], "exactly one of --tokenizer"),
        (["inspect", "{src}"], "no .bin shard files"),
    ],
)
def test_cli_errors_are_one_line(src, tmp_path, args, message):
    argv = ["shards"] + [a.format(tmp=tmp_path, src=src) for a in args]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2
    error = result.stderr.strip()
    assert error.startswith("error:") and "\n" not in error and message in error
    assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def test_cli_inspect_missing_dir_fails_before_work(tmp_path):
    result = runner.invoke(app, ["shards", "inspect", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "Invalid value for 'DIR'" in result.output


def test_byte_corpus_ids_fit_uint32(src, tmp_path):
    build(src, tmp_path / "out")
    raw = np.fromfile(tmp_path / "out" / "train" / "train_000000.bin", dtype="<u4")
    assert raw.max() == 256 and raw[-1] == 256
