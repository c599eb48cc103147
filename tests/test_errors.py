"""The error paths keep the contract (issue 19): full disks, concurrent runs, hostile files.

Every case runs the real code on real files (a real full filesystem, a real second process, a
real unprivileged user) and checks one line on stderr, the exit code, and what was kept.
"""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_contract import FAST, apr, model_dir, shards

from apr_cli.distill import run as run_lib
from apr_cli.distill.checkpoints import list_checkpoints
from apr_cli.distill.options import DistillOptions
from apr_cli.distill.pipeline import TrainConfig
from apr_cli.distill.prepare import prepare
from apr_cli.errors import AprError

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def one_line(err):
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    return err


def files(folder):
    """Every file under `folder` (the lock file aside) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def apr_process(*args, cwd=None, **kwargs):
    return subprocess.Popen(
        [sys.executable, "-m", "apr_cli", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, "PYTHONPATH": str(Path(__file__).parents[1])},
        cwd=cwd,
        **kwargs,
    )


def wait_for_line(proc, prefix, step=0):
    """Read stdout up to a line starting with `prefix` (a step line: up to `step`)."""
    for line in proc.stdout:
        if line.startswith(prefix) and (not step or int(line.split()[1].split("/")[0]) >= step):
            return line
    raise AssertionError(f"no line starting {prefix!r}: {proc.stderr.read()}")


def completed_run(capsys, tmp_path, *args):
    out = tmp_path / "run"
    code, _, err = apr(capsys, "distill", *FAST, "--out", out, *args)
    assert code == 0, err
    return out


# 1. A full disk: exit 4, one line, the first error kept, the manifest `failed` if it fits.


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MB filesystem (tmpfs), unmounted afterwards; skipped where mounting is refused."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(disk, leave=0):
    """Fill the filesystem with a real file, leaving about `leave` bytes free."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    filler = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    with open(filler, "wb") as f:
        try:
            f.write(b"\0" * max(0, free - leave))
            f.flush()
        except OSError:  # ENOSPC: full, as wanted
            pass


def test_disk_full_at_start_is_one_line_exit_4(capsys, small_disk):
    fill(small_disk)
    code, _, err = apr(capsys, "distill", *FAST, "--out", small_disk / "run")
    assert code == 4
    assert "No space left on device" in one_line(err) and "dispatch.json" in err


@pytest.mark.slow  # a second process
def test_disk_full_mid_run_is_one_line_exit_4(tmp_path, small_disk):
    out = small_disk / "run"
    proc = apr_process("distill", *FAST[:-1], "100000", "--save-every", "0", "--out", out)
    wait_for_line(proc, "step ", step=3)
    fill(small_disk)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 4
    assert "No space left on device" in one_line(err)
    assert "launch-victory.txt" in err or "metrics.jsonl" in err
    manifest = json.loads((out / "dispatch.json").read_text())
    # The manifest is `failed`, or the line says why it could not be marked so.
    assert manifest["status"] == "failed" or "could not record it in dispatch.json" in err


def test_disk_full_writing_the_student_marks_the_run_failed(tmp_path, small_disk):
    student = model_dir(tmp_path, "student")  # hidden 32: checkpoints of ~0.4 MB
    options = DistillOptions(
        student=str(student),
        teacher_warmup=0,
        save_every=2,
        train=TrainConfig(steps=3, batch_size=4, seq_len=16),
    )
    p = prepare(options)
    run, manifest = run_lib.start(p, small_disk / "run", emit=lambda line: None)

    def after_step(step, steps):  # after the last: room for the final checkpoint, not the student
        if step == steps:
            (checkpoint,) = list_checkpoints(run.path)
            fill(small_disk, leave=checkpoint.stat().st_size + 32 * 1024)

    with pytest.raises(AprError) as failure:
        run_lib.train_run(p, run, manifest, emit=lambda line: None, on_progress=after_step)
    assert failure.value.exit_code == 4
    assert "student-trained.apr" in str(failure.value) and "\n" not in str(failure.value)
    assert list_checkpoints(run.path)[-1].name == "step-00000003.pt"
    assert not (run.path / "student-trained.apr").exists()
    assert json.loads((run.path / "dispatch.json").read_text())["status"] == "failed"


def test_disk_full_in_shards_build_is_one_line_exit_4(capsys, tmp_path, small_disk):
    text = tmp_path / "doc.txt"
    text.write_text("def f():\n    return 1\n" * 20000)
    fill(small_disk)
    code, _, err = apr(
        capsys, "shards", "build", text, "--out", small_disk / "data", "--tokenizer", "bytes"
    )
    assert code == 4
    assert "No space left on device" in one_line(err)
    assert not (small_disk / "data").exists()


# 2. One run at a time in a run directory: an OS lock that dies with its holder.


@pytest.mark.slow  # a second process
def test_a_second_run_into_a_locked_out_is_refused_naming_the_holder(capsys, tmp_path):
    out = completed_run(capsys, tmp_path)
    before = files(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from apr_cli.distill.rundir import RunDirectory; "
         "RunDirectory(sys.argv[1]).lock('--out'); print('locked', flush=True); sys.stdin.read()",
         str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**ENV, "PYTHONPATH": str(Path(__file__).parents[1])},
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "locked\n"
        for args in (["--resume", out, "--steps", "3"], [*FAST, "--out", out, "--overwrite"]):
            code, _, err = apr(capsys, "distill", *args)
            assert code == 2
            assert f"pid {holder.pid} on " in one_line(err) and "in use" in err
        assert files(out) == before
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock, nothing stale is left
        holder.wait()
    code, _, err = apr(capsys, "distill", "--resume", out, "--steps", "3")
    assert code == 0, err


# 3. Hostile config.json values: refused by name before any model is built.


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("num_attention_heads", 0),
        ("hidden_size", -32),
        ("hidden_size", 32.7),
        ("num_key_value_heads", "2"),
        ("rms_norm_eps", -1),
        ("rope_theta", float("nan")),
        ("tie_word_embeddings", "yes"),
    ],
)
def test_hostile_config_values_are_refused(capsys, tmp_path, key, value):
    folder = model_dir(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.pop("head_dim")  # optional in Qwen2 configs; its own check would hide the others
    (folder / "config.json").write_text(json.dumps({**config, key: value}))
    code, _, err = apr(capsys, "distill", *FAST, "--teacher", folder, "--out", tmp_path / "out")
    assert code == 2
    assert key in one_line(err) and "config.json" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # a second process
def test_a_billion_layers_is_refused_at_once_even_with_plan(tmp_path):
    folder = model_dir(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 10**9}))

    def capped():  # the old code built a billion layers, its memory growing: cap it at 8 GiB
        resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, 8 * 2**30))

    proc = apr_process("distill", *FAST, "--teacher", folder, "--plan", preexec_fn=capped)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2
    assert "num_hidden_layers 1000000000" in one_line(err) and "1 layers" in err


# 4. Bad files and sizes that used to end in a traceback.


def index_folder(tmp_path, weight_map):
    folder = model_dir(tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize(
    ("weight_map", "needle"),
    [
        (["model.safetensors"], "weight_map must be an object"),
        ({"model.norm.weight": 5}, "weight_map entry 5"),
        # 9. entries are confined to the model's folder
        ({"model.norm.weight": "../student/model.safetensors"}, "outside the model folder"),
        ({"model.norm.weight": "/etc/passwd"}, "outside the model folder"),
    ],
    ids=["list", "number", "parent", "absolute"],
)
def test_bad_weight_maps_are_one_line(capsys, tmp_path, weight_map, needle):
    folder = index_folder(tmp_path, weight_map)
    code, _, err = apr(capsys, "distill", *FAST, "--teacher", folder, "--plan")
    assert code == 2
    assert needle in one_line(err) and "model.safetensors.index.json" in err


@pytest.mark.parametrize(
    "manifest",
    [b"\xff\xfe not utf-8", b"[1, 2]", None],
    ids=["not-utf8", "not-an-object", "a-directory"],
)
def test_broken_manifests_are_one_line(capsys, tmp_path, manifest):
    run = tmp_path / "run"
    run.mkdir()
    if manifest is None:
        (run / "dispatch.json").mkdir()
    else:
        (run / "dispatch.json").write_bytes(manifest)
    code, _, err = apr(capsys, "distill", *FAST, "--out", run)
    assert code == 2 and "already holds a run (status unreadable)" in one_line(err)
    code, _, err = apr(capsys, "distill", "--resume", run)
    assert code == 2 and "not a run directory" in one_line(err)


def rewrite_checkpoint(run, change):
    path = list_checkpoints(run)[-1]
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def test_checkpoint_missing_keys_is_one_line(capsys, tmp_path):
    run = completed_run(capsys, tmp_path)
    rewrite_checkpoint(run, lambda state: state.pop("options"))
    code, _, err = apr(capsys, "distill", "--resume", run, "--steps", "3")
    assert code == 2 and "no checkpoint can be read" in one_line(err) and "'options'" in err


def test_checkpoint_with_unknown_option_fields_is_one_line(capsys, tmp_path):
    run = completed_run(capsys, tmp_path)
    rewrite_checkpoint(run, lambda state: state["options"].update(future_flag=True))
    code, _, err = apr(capsys, "distill", "--resume", run, "--steps", "3")
    assert code == 2 and "future_flag" in one_line(err)


def test_a_batch_that_cannot_fit_in_memory_is_refused_up_front(capsys, tmp_path):
    code, _, err = apr(capsys, "distill", *FAST, "--batch-size", 10**12, "--out", tmp_path / "out")
    assert code == 2 and "--batch-size 1000000000000" in one_line(err) and "memory" in err
    assert not (tmp_path / "out").exists()


def as_nobody(*args, cwd):
    """Run apr as an unprivileged user (root reads and writes anything)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged user")
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         sys.executable, "-m", "apr_cli", *map(str, args)],
        capture_output=True, text=True, timeout=300, cwd=cwd,
        env={**ENV, "PYTHONPATH": str(Path(__file__).parents[1]), "HOME": str(cwd)},
    )  # fmt: skip
    if "setpriv" in proc.stderr and proc.returncode != 2:
        pytest.skip(f"cannot switch user here: {proc.stderr.strip()}")
    return proc


@pytest.fixture
def open_dir():
    """A folder an unprivileged user can enter (pytest's own tmp is closed to others)."""
    folder = Path(tempfile.mkdtemp(prefix="apr-errors-"))
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder)


@pytest.mark.slow  # a second process
def test_unreadable_shard_is_one_line_as_a_user(open_dir):
    data = shards(open_dir, np.arange(2000) % 500)
    os.chmod(data, 0o755)
    os.chmod(data / "a.bin", 0o000)
    proc = as_nobody("distill", *FAST, "--dataset", data, "--plan", cwd=open_dir)
    assert proc.returncode == 2
    assert "a.bin" in one_line(proc.stderr) and "Permission denied" in proc.stderr


@pytest.mark.slow  # a second process
def test_out_under_a_read_only_folder_is_one_line_as_a_user(open_dir):
    locked = open_dir / "locked"
    locked.mkdir(mode=0o555)
    proc = as_nobody("distill", *FAST, "--out", locked / "run", cwd=open_dir)
    assert proc.returncode == 2
    assert "locked/run" in one_line(proc.stderr) and "Permission denied" in proc.stderr


# 5. User text is never markup.


@pytest.mark.parametrize("name", ["[/x]", "models[v2]", "[a-z]", "[bold]x"])
def test_brackets_in_paths_reach_the_message(capsys, tmp_path, name):
    code, _, err = apr(capsys, "distill", *FAST, "--teacher", tmp_path / name, "--plan")
    assert code == 2 and name in one_line(err)


def test_brackets_in_a_shards_build_glob_reach_the_message(capsys, tmp_path):
    pattern = str(tmp_path / "x[/]*.py")
    code, _, err = apr(capsys, "shards", "build", pattern, "--out", tmp_path / "o",
                       "--tokenizer", "bytes")  # fmt: skip
    assert code == 2 and pattern in one_line(err)


# 6. A refused resume writes nothing.


def test_refused_resume_leaves_the_run_as_it_was(capsys, tmp_path):
    data = shards(tmp_path, np.arange(4000) % 500)
    run = completed_run(capsys, tmp_path, "--dataset", data)
    before = files(run)
    shards(tmp_path, np.arange(100) % 500, name="b.bin")  # the dataset changed since
    code, _, err = apr(capsys, "distill", "--resume", run, "--steps", "3")
    assert code == 2 and "tokens" in one_line(err)
    assert files(run) == before
    assert json.loads((run / "dispatch.json").read_text())["status"] == "completed"


# 7. Paths are stored absolute: a resume from another directory finds the same files.


def test_resume_from_another_directory_with_relative_paths(capsys, tmp_path, monkeypatch):
    shards(tmp_path, np.arange(4000) % 500)
    model_dir(tmp_path, "models/student")
    monkeypatch.chdir(tmp_path)
    args = ["--dataset", "data", "--student", "models/student", "--out", "run"]
    code, _, err = apr(capsys, "distill", *FAST, *args)
    assert code == 0, err
    manifest = json.loads((tmp_path / "run" / "dispatch.json").read_text())
    assert manifest["options"]["dataset"] == str(tmp_path / "data")
    assert manifest["options"]["student"] == str(tmp_path / "models" / "student")
    assert manifest["cwd"] == str(tmp_path)  # with `command`, the paths as given
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = apr(capsys, "distill", "--resume", tmp_path / "run", "--steps", "3")
    assert code == 0, err


# 8. --overwrite keeps the old run until the new one has passed every check.


@pytest.mark.parametrize(
    "bad", [["--temperature", "inf"], ["--weight-decay", "nan"], ["--grad-clip", "inf"]]
)
def test_overwrite_with_a_bad_value_keeps_the_old_run(capsys, tmp_path, bad):
    run = completed_run(capsys, tmp_path)
    before = files(run)
    code, _, err = apr(capsys, "distill", *FAST, "--out", run, "--overwrite", *bad)
    assert code == 2 and bad[0] in one_line(err)
    assert files(run) == before


# 11. Temporaries of a checkpoint write killed half-way are cleaned up on resume.


def test_stale_checkpoint_temporaries_are_removed_on_resume(capsys, tmp_path):
    run = completed_run(capsys, tmp_path)
    stale = run / "checkpoints" / ".step-00000003.pt.k9x2.tmp"
    stale.write_bytes(b"\0" * 4096)  # what kill -9 during a checkpoint write leaves
    stale_manifest = run / ".dispatch.json.a1b2.tmp"
    stale_manifest.write_bytes(b"{")
    code, _, err = apr(capsys, "distill", "--resume", run, "--steps", "3")
    assert code == 0, err
    assert not stale.exists() and not stale_manifest.exists()


# 12. A corrupt newest checkpoint falls back to the newest one that loads.


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(capsys, tmp_path):
    run = completed_run(capsys, tmp_path, "--save-every", "1")
    older, newest = list_checkpoints(run)
    newest.write_bytes(newest.read_bytes()[:1000])  # torn
    code, out, err = apr(capsys, "distill", "--resume", run, "--steps", "3")
    assert code == 0, err
    warning = [line for line in out.splitlines() if "cannot be read" in line]
    assert len(warning) == 1 and f"resuming from {older.name}" in warning[0]
    assert (run / "checkpoints" / f"{newest.name}.corrupt").exists()
    assert list_checkpoints(run)[-1].name == "step-00000003.pt"


def test_no_readable_checkpoint_is_refused_in_one_line(capsys, tmp_path):
    run = completed_run(capsys, tmp_path)
    (checkpoint,) = list_checkpoints(run)
    torch.save({"f": print}, checkpoint)  # a pickle a weights-only load refuses
    before = files(run)
    code, _, err = apr(capsys, "distill", "--resume", run, "--steps", "3")
    assert code == 2 and "no checkpoint can be read" in one_line(err)
    assert "weights_only" not in err and "Unsupported global" in err
    assert files(run) == before


# 13. The smaller cases.


@pytest.mark.parametrize("kind", ["dangling", "loop", "fifo", "device"])
def test_bin_entries_that_are_not_files_are_refused_by_name(capsys, tmp_path, kind):
    data = shards(tmp_path, np.arange(4000) % 500)
    entry = data / "b.bin"
    if kind == "dangling":
        entry.symlink_to(tmp_path / "gone.bin")
    elif kind == "loop":
        entry.symlink_to(entry)
    elif kind == "fifo":
        os.mkfifo(entry)
    else:
        entry.symlink_to("/dev/zero")
    code, _, err = apr(capsys, "distill", *FAST, "--dataset", data, "--plan")
    assert code == 2 and "b.bin" in one_line(err)


def test_shards_build_refuses_an_out_that_holds_its_inputs(capsys, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.py").write_text("print(1)\n")
    code, _, err = apr(capsys, "shards", "build", src, "--out", src, "--force",
                       "--tokenizer", "bytes")  # fmt: skip
    assert code == 2 and "holds the input" in one_line(err)
    assert (src / "a.py").read_text() == "print(1)\n"


@pytest.mark.slow  # a second process
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_the_teacher_warm_up_says_what_happened(tmp_path, signum):
    out = tmp_path / "run"
    proc = apr_process("distill", *FAST[:4], "--teacher-warmup", "100000", "--out", out)
    wait_for_line(proc, "dataset:")  # printed just before the warm-up starts
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    assert "during the teacher warm-up" in one_line(err) and "nothing to resume" in err
    assert json.loads((out / "dispatch.json").read_text())["status"] == "interrupted"


def test_out_holding_an_interrupted_run_reads_well(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "dispatch.json").write_text(json.dumps({"status": "interrupted"}))
    code, _, err = apr(capsys, "distill", *FAST, "--out", run)
    assert code == 2 and "(status interrupted)" in one_line(err) and "a interrupted" not in err
