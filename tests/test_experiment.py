"""`apr train`, `apr eval` and the KD-vs-CE experiment script end to end at tiny sizes."""

import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from apr_cli.cli import app
from apr_cli.data.shards import write_shard
from apr_cli.model.checkpoint import load_model, save_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import build_model

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=128,
    torch_dtype="float32",
)
TRAIN = ["--seq-len", "16", "--batch-size", "4", "--device", "cpu"]


def apr(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture()
def model_and_data(tmp_path):
    """A tiny random model folder and a 1001-token dataset: 62 windows of 16 tokens."""
    model_dir = tmp_path / "model"
    save_model(build_model(TINY, seed=3), model_dir)
    data = tmp_path / "data"
    data.mkdir()
    ids = np.random.default_rng(0).integers(0, TINY.vocab_size, 1001)
    write_shard(data / "a.bin", ids[:500])
    write_shard(data / "b.bin", ids[500:])  # windows span the file boundary
    return model_dir, data, ids


def direct_loss(model_dir: Path, ids: np.ndarray, starts: list[int], seq_len: int) -> float:
    """Mean CE over the labels of the windows starting at `starts`, one window at a time."""
    model, _ = load_model(str(model_dir), dtype=torch.float32)
    losses = []
    with torch.no_grad():
        for start in starts:
            w = torch.from_numpy(ids[start : start + seq_len + 1].astype(np.int64))[None]
            losses.append(F.cross_entropy(model(w[:, :-1])[0], w[0, 1:]).item())
    return sum(losses) / len(losses)


def test_eval_matches_a_direct_computation_over_evenly_spaced_windows(model_and_data):
    model_dir, data, ids = model_and_data
    r = apr("eval", model_dir, "--dataset", data, "--windows", 5, "--seq-len", 16, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    # 62 windows; 5 evenly spaced from window 0: i * 62 // 5.
    starts = [k * 16 for k in (0, 12, 24, 37, 49)]
    assert report["windows"] == 5 and report["windows_per_epoch"] == 62
    assert report["tokens"] == 5 * 16 and report["selection"] == "evenly spaced"
    assert report["loss"] == pytest.approx(direct_loss(model_dir, ids, starts, 16), rel=1e-5)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]))


def test_eval_is_deterministic_whatever_the_batch_size(model_and_data):
    model_dir, data, ids = model_and_data
    results = []
    for batch in (1, 7, 64):
        r = apr("eval", model_dir, "--dataset", data, "--windows", 0, "--seq-len", 16,
                "--batch-size", batch, "--json")  # fmt: skip
        assert r.exit_code == 0, r.output
        results.append(json.loads(r.stdout))
    assert {x["windows"] for x in results} == {62} and results[0]["selection"] == "all"
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6)
    assert results[0]["loss"] == pytest.approx(results[2]["loss"], rel=1e-6)
    starts = [k * 16 for k in range(62)]
    assert results[0]["loss"] == pytest.approx(direct_loss(model_dir, ids, starts, 16), rel=1e-5)
    text = apr("eval", model_dir, "--dataset", data, "--windows", 0, "--seq-len", 16)
    assert text.exit_code == 0
    assert f"loss: {results[0]['loss']:.4f}  perplexity: {results[0]['perplexity']:.2f}" in (
        text.stdout
    )


def test_eval_checks_ids_against_the_model_vocab(model_and_data, tmp_path):
    model_dir, _, _ = model_and_data
    bad = tmp_path / "bad"
    bad.mkdir()
    write_shard(bad / "a.bin", [1, 2, TINY.vocab_size, 3] * 20)
    r = apr("eval", model_dir, "--dataset", bad, "--seq-len", 16)
    assert r.exit_code == 2
    assert "token id 64 at token offset 2 is >= vocab size 64" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


def test_eval_refuses_a_seq_len_beyond_the_model_context(model_and_data):
    model_dir, data, _ = model_and_data
    r = apr("eval", model_dir, "--dataset", data, "--seq-len", 256)
    assert r.exit_code == 2 and "exceeds the model's context of 128" in r.stderr


def test_train_is_cross_entropy_only_with_no_teacher(model_and_data, tmp_path):
    model_dir, data, _ = model_and_data
    run = tmp_path / "run"
    r = apr("train", "--model", model_dir, "--dataset", data, "--steps", 3, *TRAIN, "--out", run)
    assert r.exit_code == 0, r.output
    assert "Training complete: initial_loss=" in r.stdout
    manifest = json.loads((run / "dispatch.json").read_text())
    assert manifest["status"] == "completed" and manifest["steps"] == 3
    assert manifest["teacher"] is None and manifest["options"]["teacher"] is None
    assert manifest["student"]["path"] == str(model_dir.resolve())
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(m["kd_loss"] == 0 and m["loss"] == m["ce_loss"] for m in metrics)
    trained, _ = load_model(str(run / "student-trained.apr"))
    assert trained.config == TINY.with_(torch_dtype="float32")
    plan = apr("train", "--model", model_dir, "--dataset", data, *TRAIN, "--plan")
    assert "teacher: none" in plan.stdout and "cross-entropy on the labels" in plan.stdout


def test_train_resumes_exactly_and_refuses_changes(model_and_data, tmp_path):
    model_dir, data, _ = model_and_data
    args = ["--model", model_dir, "--dataset", data, "--steps", 6, "--save-every", 3, *TRAIN]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    for run in (reference, resumed):
        assert apr("train", *args, "--out", run).exit_code == 0
    # Back to the step-3 checkpoint, as if the run had died after it.
    (resumed / "checkpoints" / "step-00000006.pt").unlink()
    shutil.rmtree(resumed / "student-trained.apr")
    r = apr("train", "--resume", resumed)
    assert r.exit_code == 0, r.output
    assert "resumed from step-00000003.pt (step 3)" in r.stdout

    def losses(run):
        return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]

    assert losses(resumed) == losses(reference)
    a = load_file(resumed / "student-trained.apr" / "model.safetensors")
    b = load_file(reference / "student-trained.apr" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in b)
    refused = apr("train", "--resume", resumed, "--lr", "1e-4")
    assert refused.exit_code == 2 and "would change the result" in refused.stderr


def test_train_default_run_dir_is_runs_train(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = apr("train", "--steps", 1, *TRAIN)
    assert r.exit_code == 0, r.output
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("train-") and (run / "student-trained.apr").is_dir()


STDLIB_MODULES = ["json", "textwrap.py", "string.py", "shlex.py", "glob.py", "fnmatch.py",
                  "bisect.py", "heapq.py", "base64.py", "csv.py", "abc.py", "copy.py"]  # fmt: skip


@pytest.mark.parametrize("size, steps", [("full", "1500"), ("tiny", "30")])
def test_experiment_script_prints_its_plan_first(tmp_path, size, steps):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.py").write_text("x = 1\n" * 300_000)  # 1.8 MB: ~6 s of shards at 40 s/12 MB
    env = {**os.environ, "SIZE": size, "CORPUS": str(corpus), "PLAN_ONLY": "1"}
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", ROOT / "scripts" / "kd-vs-ce.sh", out, "3", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    plan = proc.stderr.splitlines()
    assert plan[0] == f"kd-vs-ce: plan (SIZE={size}): 1 .py files from {corpus}, seeds 3 4"
    assert f"apr train tiny-teacher, {steps} steps of" in plan[2]
    teacher_s, seed_s = {"full": (550, 110), "tiny": (10, 20)}[size]
    minutes = -(-(6 + teacher_s + 2 * seed_s) // 60)
    assert plan[-1] == (
        f"kd-vs-ce:   rough time on an idle 2-core CPU: {minutes} min (shards 6 s, "
        f"teacher {teacher_s} s, {seed_s} s per seed)"
    )
    assert proc.stdout == "" and not out.exists()  # only the plan: nothing run or written


@pytest.mark.slow
def test_experiment_script_end_to_end(tmp_path):
    """scripts/kd-vs-ce.sh at SIZE=tiny on a few stdlib modules: every step and the table; run
    again on the same OUT with TEACHER_CACHE=topk, it keeps the teacher and adds a student
    distilled from a top-k cache."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name in STDLIB_MODULES:
        copy = shutil.copytree if (stdlib / name).is_dir() else shutil.copy
        copy(stdlib / name, corpus / name)
    (corpus / "tests").mkdir()
    (corpus / "tests" / "skipped.py").write_text("assert False  # test folders are left out\n")
    out, evidence = tmp_path / "out", tmp_path / "evidence"
    env = {
        **os.environ,
        "SIZE": "tiny",
        "CORPUS": str(corpus),
        "EVIDENCE": str(evidence),
        "APR": str(Path(sys.executable).parent / "apr"),
        "PYTHON": sys.executable,
    }

    def script(**extra):
        proc = subprocess.run(
            ["bash", ROOT / "scripts" / "kd-vs-ce.sh", out, "7"],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        phases = [line for line in proc.stderr.splitlines() if line.startswith("kd-vs-ce: ")]
        assert phases[0].startswith("kd-vs-ce: plan (SIZE=tiny)") and "seeds 7" in phases[0]
        assert any(p.startswith("kd-vs-ce:   rough time on an idle 2-core CPU: ") for p in phases)
        # The phases as they start ("kd-vs-ce: 2. ..."), not the plan's indented lines.
        steps = [p.split()[1] for p in phases[1:] if not p.startswith("kd-vs-ce:  ")]
        table = (out / "table.md").read_text()
        assert table == proc.stdout[proc.stdout.index("| seed |") :]
        return proc, steps, table

    proc, steps, table = script()
    assert steps == ["1.", "2.", "3.", "4."]
    meta = json.loads((out / "data" / "val" / "meta.json").read_text())
    train_meta = json.loads((out / "data" / "train" / "meta.json").read_text())
    assert meta["tokenizer_source"].startswith("byte-level BPE") and meta["vocab_size"] <= 512
    assert meta["documents"] > 0 and train_meta["documents"] > 0
    assert not any("skipped.py" in s for s in train_meta["sources"])
    paths = {"teacher": "teacher", "kd": "seed-7/kd", "ce": "seed-7/ce"}
    runs = {role: json.loads((out / p / "dispatch.json").read_text()) for role, p in paths.items()}
    assert all(m["status"] == "completed" for m in runs.values())
    assert runs["teacher"]["teacher"] is None and runs["ce"]["teacher"] is None
    assert runs["kd"]["teacher"]["path"] == str((out / "teacher" / "student-trained.apr").resolve())
    assert runs["kd"]["steps"] == runs["ce"]["steps"]
    assert runs["kd"]["tokens"] == runs["ce"]["tokens"]
    # Same init and the same first batch: step 1's CE is identical in both student runs.
    first = {
        role: json.loads((out / "seed-7" / role / "metrics.jsonl").read_text().splitlines()[0])
        for role in ("kd", "ce")
    }
    assert first["kd"]["ce_loss"] == first["ce"]["ce_loss"]
    first_ce = first["kd"]["ce_loss"]
    for path in ("eval-teacher.json", "seed-7/eval-kd.json", "seed-7/eval-ce.json"):
        report = json.loads((out / path).read_text())
        assert report["data"]["path"] == str((out / "data" / "val").resolve())
        assert math.isfinite(report["loss"])
    assert table.count("| 7 |") == 3 and "seed 7: CE student's val loss minus" in table
    assert "| ? |" not in table  # every run's step-1 CE is known
    assert "cache" not in table
    copied = {p.relative_to(evidence).as_posix() for p in evidence.rglob("*") if p.is_file()}
    assert "seed-7/kd/dispatch.json" in copied and "seed-7/eval-ce.json" in copied
    assert not any(name.endswith((".safetensors", ".bin", ".pt")) for name in copied)
    regenerated = subprocess.run(
        [sys.executable, ROOT / "scripts" / "kd-vs-ce-table.py", evidence],
        capture_output=True,
        text=True,
    )
    assert regenerated.returncode == 0, regenerated.stderr
    assert regenerated.stdout == table

    teacher = (out / "teacher" / "student-trained.apr" / "model.safetensors").read_bytes()
    proc, steps, table = script(TEACHER_CACHE="topk")
    assert steps == ["1.", "2.", "2.", "3.", "4."]
    assert "nothing to do" in proc.stderr
    assert (out / "teacher" / "student-trained.apr" / "model.safetensors").read_bytes() == teacher
    topk = json.loads((out / "seed-7" / "kd-topk" / "dispatch.json").read_text())
    assert topk["status"] == "completed" and topk["steps"] == runs["kd"]["steps"]
    assert topk["teacher"]["kind"] == "teacher-cache (topk)"
    assert topk["teacher"]["spec"] == runs["kd"]["teacher"]["spec"]
    first = (out / "seed-7" / "kd-topk" / "metrics.jsonl").read_text().splitlines()[0]
    assert json.loads(first)["ce_loss"] == first_ce
    assert table.count("| 7 |") == 4 and "| 7 | KD student, top-32 teacher cache" in table
    assert "seed 7: topk cache student's val loss minus the online-KD student's" in table
    assert "Cache topk: 130 bytes/token" in table and "| ? |" not in table
    copied = {p.relative_to(evidence).as_posix() for p in evidence.rglob("*") if p.is_file()}
    assert {"seed-7/kd-topk/dispatch.json", "seed-7/eval-kd-topk.json", "cache-topk.json"} <= copied
    assert not any(name.endswith((".safetensors", ".bin", ".pt")) for name in copied)
