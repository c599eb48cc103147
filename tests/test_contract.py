"""The bad-input contract (docs/errors.md): every row is one line on stderr, a non-zero exit,
no traceback, and nothing already written lost."""

import json
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from apr_cli.cli import main
from apr_cli.distill.checkpoints import list_checkpoints
from apr_cli.model.checkpoint import save_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import build_model

FAST = ["--seq-len", "16", "--batch-size", "4", "--teacher-warmup", "0", "--steps", "2"]
TINY = ModelConfig.from_name("tiny-student").with_(
    vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1
)


def apr(capsys, *args):
    """Run the real entry point in-process; returns (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def model_dir(tmp_path, name="model", config=TINY):
    return save_model(build_model(config, seed=1), tmp_path / name)


def shards(tmp_path, tokens, name="a.bin"):
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    np.asarray(tokens, dtype="<u4").tofile(folder / name)
    return folder


def corrupt_tensor(folder, change):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)
    return folder


def case_dataset_missing(tmp_path):
    return ["--dataset", tmp_path / "nope"], "--dataset"


def case_dataset_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return ["--dataset", tmp_path / "empty"], ".bin"


def case_dataset_without_bin(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "notes.txt").write_text("hello")
    return ["--dataset", tmp_path / "txt"], ".bin"


def case_truncated_shard(tmp_path):
    folder = shards(tmp_path, range(1000))
    with open(folder / "a.bin", "ab") as f:
        f.write(b"\x01\x02")  # half a token
    return ["--dataset", folder], "a.bin"


def case_token_beyond_vocab(tmp_path):
    tokens = np.arange(2000) % 500
    tokens[1234] = 9999
    return ["--dataset", shards(tmp_path, tokens)], "1234"


def case_corpus_shorter_than_a_window(tmp_path):
    return ["--dataset", shards(tmp_path, range(10))], "shorter than one window"


def case_teacher_missing(tmp_path):
    return ["--teacher", tmp_path / "no-teacher"], "no-teacher"


def case_config_missing(tmp_path):
    folder = model_dir(tmp_path)
    (folder / "config.json").unlink()
    return ["--teacher", folder], "config.json"


def case_config_invalid(tmp_path):
    folder = model_dir(tmp_path)
    (folder / "config.json").write_text("{not json")
    return ["--teacher", folder], "config.json"


def case_tensor_missing(tmp_path):
    folder = corrupt_tensor(model_dir(tmp_path), lambda t: t.pop("model.norm.weight"))
    return ["--teacher", folder], "model.norm.weight"


def case_tensor_wrong_shape(tmp_path):
    def shrink(t):
        t["model.norm.weight"] = torch.ones(7)

    return ["--teacher", corrupt_tensor(model_dir(tmp_path), shrink)], "model.norm.weight"


def case_safetensors_corrupt_header(tmp_path):
    folder = model_dir(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    return ["--teacher", folder], "model.safetensors"


def case_only_pickle(tmp_path):
    folder = model_dir(tmp_path)
    (folder / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    return ["--teacher", folder], "pickle"


def case_vocab_not_alignable(tmp_path):
    teacher = model_dir(tmp_path, "teacher", TINY.with_(vocab_size=4096))
    return ["--teacher", teacher], "cannot be aligned"


def case_steps(tmp_path):
    return ["--steps", "0"], "--steps"


def case_lr(tmp_path):
    return ["--lr", "0"], "--lr"


def case_temperature(tmp_path):
    return ["--temperature", "-1"], "--temperature"


def case_alpha(tmp_path):
    return ["--alpha", "1.5"], "--alpha"


def case_seq_len_beyond_context(tmp_path):
    return ["--seq-len", "4096"], "--seq-len"


def case_resume_without_checkpoint(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "dispatch.json").write_text(json.dumps({"status": "failed"}))
    return ["--resume", tmp_path / "run"], "--resume"


CASES = [value for name, value in sorted(globals().items()) if name.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.__name__.removeprefix("case_"))
def test_bad_input_is_refused_before_any_work(tmp_path, capsys, case):
    args, needle = case(tmp_path)
    out_dir = tmp_path / "out"
    code, _, err = apr(capsys, "distill", *FAST, "--out", out_dir, *args)
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err
    assert not out_dir.exists()


def test_out_holding_a_completed_run_is_kept(tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert apr(capsys, "distill", *FAST, "--out", out_dir)[0] == 0
    before = {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()}
    code, _, err = apr(capsys, "distill", *FAST, "--out", out_dir)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert before == {p.name: p.read_bytes() for p in out_dir.iterdir() if p.is_file()}


def test_non_finite_loss_fails_the_run_and_keeps_the_last_checkpoint(tmp_path, capsys):
    out_dir = tmp_path / "out"
    args = ["--seq-len", "16", "--batch-size", "4", "--teacher-warmup", "0", "--warmup", "0"]
    code, _, err = apr(capsys, "distill", *args, "--steps", 6, "--save-every", 1,
                       "--lr", "1e30", "--out", out_dir)  # fmt: skip
    assert code == 3
    assert "loss became nan" in err and len(err.strip().splitlines()) == 1
    manifest = json.loads((out_dir / "dispatch.json").read_text())
    assert manifest["status"] == "failed" and "nan" in manifest["error"]
    saved = list_checkpoints(out_dir)
    assert saved, "the last good checkpoint is kept"
    state = torch.load(saved[-1], weights_only=True)
    assert all(np.isfinite(x) for x in state["pipeline"]["losses"])
    assert not (out_dir / "student-trained.apr").exists()


@pytest.mark.slow
def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, capsys):
    out_dir = tmp_path / "out"
    args = ["--seq-len", "16", "--batch-size", "4", "--teacher-warmup", "0", "--save-every", "2"]
    assert apr(capsys, "distill", *args, "--steps", 4, "--out", out_dir)[0] == 0
    before = list_checkpoints(out_dir)[-1].read_bytes()

    def small_files():  # files over 1 MiB cannot be written: the checkpoint write fails
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))

    proc = subprocess.run(
        [sys.executable, "-m", "apr_cli", "distill", "--resume", out_dir, "--steps", "8"],
        preexec_fn=small_files,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 4
    assert "could not be written" in proc.stderr and "previous checkpoint is intact" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    latest = list_checkpoints(out_dir)[-1]
    assert latest.name == "step-00000004.pt" and latest.read_bytes() == before
    assert not [p for p in (out_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert json.loads((out_dir / "dispatch.json").read_text())["status"] == "failed"
