"""What a newcomer meets in the first hour: file modes, help speed and surface, run outputs."""

from __future__ import annotations

import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import typer
from rich.console import Console
from typer.testing import CliRunner

import apr_cli
from apr_cli.cli import app
from apr_cli.commands.progress import ProgressBar, spinner
from apr_cli.commands.training import line_printer
from apr_cli.data.build import build_shards, collect_inputs
from apr_cli.data.shards import ShardBatchSource
from apr_cli.distill.rundir import RunDirectory, default_run_dir
from apr_cli.errors import AprError
from apr_cli.fsutil import atomic_write_bytes
from apr_cli.model.checkpoint import save_model
from apr_cli.model.config import ModelConfig
from apr_cli.model.qwen2 import build_model


def modes(root: Path) -> dict[str, int]:
    """Permission bits of `root` and everything under it, by path relative to `root`."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.stat().st_mode)
    return found


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def expected(path: Path, mask: int) -> int:
    return (0o777 if path.is_dir() else 0o666) & ~mask


def test_saved_model_follows_the_umask(tmp_path, umask):
    tiny = ModelConfig.from_name("tiny-student").with_(num_hidden_layers=1, hidden_size=32)
    out = save_model(build_model(tiny), tmp_path / "student-trained.apr")
    found = modes(out)
    assert set(found) == {".", "config.json", "model.safetensors"}
    for name, mode in found.items():
        assert mode == expected(out / name, umask), (name, oct(mode))


def test_built_shards_follow_the_umask(tmp_path, umask):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("print('hello')\n" * 50)
    out = tmp_path / "data"
    build_shards([str(src)], collect_inputs([str(src)]), out, "bytes", val_fraction=0.0)
    found = modes(out)
    assert any(name.endswith(".bin") for name in found)
    for name, mode in found.items():
        assert mode == expected(out / name, umask), (name, oct(mode))


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    atomic_write_bytes(tmp_path / "dispatch.json", b"{}")
    assert modes(tmp_path)["dispatch.json"] == 0o666 & ~umask


HELP_ARGVS = [
    ["--help"],
    ["--version"],
    ["distill", "--help"],
    ["train", "--help"],
    ["eval", "--help"],
    ["generate", "--help"],
    ["shards", "build", "--help"],
    ["shards", "inspect", "--help"],
    ["humaneval", "--help"],
]
# Run in a fresh interpreter: the test process itself has long imported torch.
HELP_PROBE = """
import json, sys
from apr_cli.cli import main
for argv in json.loads(sys.argv[1]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
heavy = {"torch", "numpy", "matplotlib", "tokenizers", "safetensors"}
print("HEAVY=" + ",".join(sorted(heavy & {m.split(".")[0] for m in sys.modules})))
"""


def test_help_and_version_import_no_heavy_module():
    proc = subprocess.run(
        [sys.executable, "-c", HELP_PROBE, json.dumps(HELP_ARGVS)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "100"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "HEAVY="
    assert f"apr {apr_cli.__version__}\n" in proc.stdout


def test_version_flag():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"apr {apr_cli.__version__}\n"


POLICY_PROBE = """
import os
from apr_cli.cli import main
try:
    main(["--version"])
except SystemExit:
    pass
print("POLICY=" + os.environ.get("OMP_WAIT_POLICY", ""))
"""


@pytest.mark.parametrize("given,expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_while_waiting_unless_the_user_says_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    proc = subprocess.run(
        [sys.executable, "-c", POLICY_PROBE], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.stdout.splitlines()[-1] == f"POLICY={expected}", proc.stderr


def test_shards_from_a_bigger_tokenizer_name_it_in_the_error(tmp_path):
    np.arange(1000, dtype="<u4").tofile(tmp_path / "a.bin")
    (tmp_path / "meta.json").write_text('{"vocab_size": 4096, "tokenizer": "tokenizer.json"}')
    with pytest.raises(AprError, match=r"token id 512 .* built with a 4096-token tokenizer"):
        ShardBatchSource(tmp_path, vocab_size=512)
    (tmp_path / "meta.json").write_text('{"vocab_size": 512}')
    with pytest.raises(AprError, match=r"is >= vocab size 600$"):
        ShardBatchSource(tmp_path, vocab_size=600)  # the tokenizer is not the cause


TINY_RUN = ["--steps", "1", "--seq-len", "8", "--batch-size", "2"]


@pytest.fixture
def keep_torch_threads():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(
    "flag,omp_env,expected",
    [
        ([], None, len(os.sched_getaffinity(0))),  # one per usable core
        (["--threads", "1"], None, 1),
        ([], "1", 1),  # the user's OMP_NUM_THREADS is kept
    ],
)
def test_threads_default_to_the_usable_cores_and_are_recorded(
    tmp_path, monkeypatch, keep_torch_threads, flag, omp_env, expected
):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if omp_env is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", omp_env)
        torch.set_num_threads(int(omp_env))  # what torch read from it when it loaded
    args = ["distill", *TINY_RUN, "--teacher-warmup", "0", *flag, "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "r" / "dispatch.json").read_text())
    assert manifest["cpu_threads"] == expected
    assert manifest["options"]["threads"] == (1 if flag else 0)


def test_negative_threads_are_refused(tmp_path):
    result = CliRunner().invoke(app, ["distill", "--threads", "-1", "--out", str(tmp_path / "r")])
    assert result.exit_code == 2 and "--threads must be >= 0" in result.stderr
    assert not (tmp_path / "r").exists()


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=100)


def test_progress_bar_redraws_show_no_markup_tags():
    console = terminal()
    emit = line_printer(console)
    with ProgressBar(console, "distill [x]", 3) as bar:
        for step in range(1, 4):
            emit(f"step {step}/3 loss=[1.0]")
            bar.update(step)
    out = console.file.getvalue()
    assert "step 3/3 loss=[1.0]" in out and "distill [x]" in out and "3/3" in out
    assert "[progress" not in out


def test_progress_bar_appears_once_its_total_is_known_and_only_on_a_terminal():
    console = terminal()
    with ProgressBar(console, "eval") as bar:
        assert console.file.getvalue() == ""  # nothing before the first update
        bar.update(0, 40)
        bar.update(40)
    assert "eval" in console.file.getvalue() and "40/40" in console.file.getvalue()
    captured = Console(file=io.StringIO())
    with ProgressBar(captured, "eval", enabled=False) as bar:
        bar.update(0, 40)
    assert captured.file.getvalue() == ""


def test_spinner_shows_the_elapsed_time_on_a_terminal_only():
    console = terminal()
    with spinner(console, "generate: compiling"):
        pass
    assert "generate: compiling" in console.file.getvalue() and "0:00:00" in console.file.getvalue()
    captured = Console(file=io.StringIO())
    with spinner(captured, "generate: compiling", enabled=False):
        pass
    assert captured.file.getvalue() == ""


def test_train_output_has_no_kd_column_and_names_the_model(tmp_path):
    result = CliRunner().invoke(
        app, ["train", "--model", "tiny-student", *TINY_RUN, "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[1].startswith("model: tiny-student (") and "no teacher" in lines[1]
    assert "teacher:" not in result.stdout
    step = next(line for line in lines if line.startswith("step "))
    assert "kd=" not in step and "ce=" not in step and " loss=" in step


def test_a_run_stopped_on_request_is_not_printed_as_an_error(capsys):
    from apr_cli.commands.common import user_errors
    from apr_cli.distill.signals import RunInterrupted

    with pytest.raises(typer.Exit) as stopped, user_errors():
        raise RunInterrupted(2, Path("runs/x"), 5, "train")
    assert stopped.value.exit_code == 130
    err = capsys.readouterr().err
    assert err.startswith("stopped: interrupted by SIGINT after step 5") and "error" not in err


def test_default_run_dirs_started_in_the_same_second_differ(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = [default_run_dir("train").as_posix() for _ in range(4)]  # mostly within one second
    assert len(set(names)) == 4 and all(Path(n).is_dir() for n in names)
    assert all(re.fullmatch(r"runs/train-\d{8}-\d{6}(-\d+)?", n) for n in names), names


def test_a_running_run_is_never_advised_to_be_overwritten(tmp_path):
    RunDirectory(tmp_path).write_manifest({"status": "running"})
    with pytest.raises(AprError, match="still running") as refused:
        RunDirectory.create(tmp_path)
    assert "--overwrite" not in str(refused.value) and f"--resume {tmp_path}" in str(refused.value)
    RunDirectory(tmp_path).write_manifest({"status": "completed"})
    with pytest.raises(AprError, match="pass --overwrite"):
        RunDirectory.create(tmp_path)


def test_resuming_a_finished_run_without_more_steps_changes_nothing(tmp_path):
    out = tmp_path / "r"
    args = ["train", *TINY_RUN, "--steps", "2", "--out", str(out)]
    assert CliRunner().invoke(app, args).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    result = CliRunner().invoke(app, ["train", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("nothing to do: ") and "completed all 2 steps" in result.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before


def test_plan_data_line_is_readable_and_shows_the_dataset_vocab(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    np.arange(2000, dtype="<u4").__mod__(300).astype("<u4").tofile(data / "a.bin")
    (data / "meta.json").write_text('{"vocab_size": 300, "tokenizer": "tokenizer.json"}')
    result = CliRunner().invoke(app, ["distill", "--plan", "--dataset", str(data), *TINY_RUN])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("data: "))
    assert line == (
        f"data: {data.resolve()}: 2,000 tokens in 1 files, tokenizer tokenizer.json, "
        "dataset vocab 300, windows read in order"
    )
    synthetic = CliRunner().invoke(app, ["distill", "--plan", *TINY_RUN]).stdout
    assert "data: synthetic batches (row i repeats token i % 512)" in synthetic


def test_teacher_warmup_says_it_started_and_how_far_it_got(tmp_path):
    args = ["distill", *TINY_RUN, "--teacher-warmup", "20", "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    warm = [line for line in result.stdout.splitlines() if line.startswith("teacher warm-up:")]
    assert warm[0].startswith("teacher warm-up: training the untrained preset teacher for 20")
    assert [w.split()[3] for w in warm[1:-1]] == [f"{s}/20" for s in range(2, 21, 2)]
    assert warm[-1].startswith("teacher warm-up: 20 CE steps on the batch source, loss ")


def test_teacher_warmup_reports_every_step_for_a_terminal_bar(tmp_path):
    from apr_cli.distill import run as run_lib
    from apr_cli.distill.options import DistillOptions, TrainConfig
    from apr_cli.distill.prepare import prepare

    train = TrainConfig(steps=1, seq_len=8, batch_size=2)
    prepared = prepare(DistillOptions(train=train, teacher_warmup=6))
    seen = []
    follow = lambda step, steps: seen.append((step, steps))  # noqa: E731
    run, _ = run_lib.start(prepared, tmp_path / "r", emit=lambda line: None, on_warmup=follow)
    run.unlock()
    assert seen == [(s, 6) for s in range(1, 7)]


def test_eval_says_what_it_scores_once_the_input_is_checked(tmp_path):
    (np.arange(400, dtype="<u4") % 512).astype("<u4").tofile(tmp_path / "a.bin")
    args = ["eval", "tiny-student", "--dataset", str(tmp_path), "--seq-len", "8"]
    result = CliRunner().invoke(app, [*args, "--windows", "4", "--json"])
    assert result.exit_code == 0, result.output
    assert result.stderr == f"eval: scoring 4 windows of 8 tokens of {tmp_path} with tiny-student\n"
    assert json.loads(result.stdout)["windows"] == 4
    refused = CliRunner().invoke(app, [*args, "--windows", "4", "--batch-size", "0"])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("error: --batch-size")


def test_generate_compile_refuses_bad_input_before_its_start_line():
    args = ["generate", "tiny-student", "--prompt-ids", "5", "--compile", "--top-p", "0"]
    refused = CliRunner().invoke(app, args)
    assert refused.exit_code == 2 and refused.stderr.startswith("error: --top-p")
    assert refused.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "argv",
    [["distill"], ["train"], ["eval"], ["generate"], ["shards", "build"], ["shards", "inspect"]],
)
def test_help_shows_no_bool_types_negations_or_stray_dots(argv):
    result = CliRunner().invoke(app, [*argv, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    rows = [row for row in result.stdout.splitlines() if "--help" not in row]
    # --compile has three states (on, off, auto when neither is given), so its negation means
    # something; every other flag only switches a setting on.
    rows = [row.replace("--no-compile", "") for row in rows]
    assert not [row for row in rows if "<bool>" in row or "--no-" in row or " . " in row]
    assert "{model}" not in result.stdout


def test_help_shows_the_defaults_that_depend_on_something():
    text = CliRunner().invoke(app, ["distill", "--help"], env={"COLUMNS": "200"}).stdout
    assert "[default: (50 for a preset teacher, else 0)]" in text
    assert "[default: (runs/COMMAND-YYYYMMDD-HHMMSS in UTC, then -2, -3... if taken)]" in text


def test_eval_device_is_not_a_training_option():
    text = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).stdout
    assert "Training" not in text and "--device" in text.split("Runtime")[1]
