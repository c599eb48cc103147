"""scripts/dispatch-distill-gx10.sh against a stand-in `ssh` that runs the remote side locally.

Only the network hop is replaced: the stand-in ssh runs the command with `bash -c` (as sshd runs
it with the login shell) in a temporary "remote" home with a clean environment, so nothing of the
local environment leaks across. Everything else is real: `git archive` of this repository's HEAD
is unpacked there, a venv is built from GX10_PYTHON, the project is pip-installed into it and
`apr distill` trains from that installed copy. These tests cover quoting, dry runs and refusals;
tests/test_dispatch_ssh.py runs the script against a real OpenSSH server.

The test machine is offline, so GX10_PYTHON is this test's own python: the run's venv sees this
environment's packages (torch, typer, ...) as it would a GPU box's CUDA torch, and the install uses
GX10_PIP_ARGS="--no-deps --no-build-isolation --no-index". Those packages are listed as plain
directories, without processing their .pth files, so this checkout's editable install of apr_cli
is invisible there: `apr` on the remote can only be the synced copy (a test checks the manifest's
command path).
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # every test here runs real processes end to end

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "dispatch-distill-gx10.sh"
HOST = "gx10-test"
SMALL_RUN = {
    "STEPS": "20",
    "SEQ_LEN": "16",
    "BATCH_SIZE": "4",
    "EXTRA_ARGS": "--teacher-warmup 5 --device cpu",
}

STANDIN_SSH = r"""#!/usr/bin/env bash
# Stand-in for ssh: logs its arguments, then runs the command like sshd would, in the "remote"
# home with a clean environment (real ssh forwards none of the caller's variables).
printf '%q ' "$@" >>"$STANDIN_LOG"
echo >>"$STANDIN_LOG"
while (($#)); do
    case $1 in
        -o | -p | -l | -i | -F | -J) shift 2 ;;
        -[46AaCfGgKkMNnqsTtVvXxYy]) shift ;;
        --) shift; break ;;
        -*) echo "stand-in ssh: unsupported option $1" >&2; exit 255 ;;
        *) break ;;
    esac
done
host=$1
shift
if [[ $host == *unreachable* ]]; then
    echo "ssh: connect to host $host port 22: Connection refused" >&2
    exit 255
fi
cd "$REMOTE_HOME" || exit 255
exec env -i HOME="$REMOTE_HOME" PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8 \
    OMP_NUM_THREADS=1 bash -c "$*"
"""

# The script must reach the remote through ssh only; these make any other route fail loudly
# instead of trying the network.
STANDIN_REFUSE = """#!/usr/bin/env bash
echo "stand-in $(basename "$0"): the dispatch script must not call this" >&2
exit 97
"""


class Remote:
    """The stand-in tool directory, the "remote" home and a way to run the script against them."""

    def __init__(self, root: Path):
        self.root = root
        self.home = root / "remote-home"
        self.local = root / "local"  # the script's working directory
        self.evidence = root / "evidence"
        self.log = root / "ssh.log"
        bin_dir = root / "bin"
        for d in (self.home, self.local, bin_dir):
            d.mkdir(parents=True, exist_ok=True)
        standins = {"ssh": STANDIN_SSH, "scp": STANDIN_REFUSE, "rsync": STANDIN_REFUSE}
        for name, text in standins.items():
            (bin_dir / name).write_text(text)
            (bin_dir / name).chmod(0o755)
        self.env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "HOME": str(self.local),
            "LANG": "C.UTF-8",
            "STANDIN_LOG": str(self.log),
            "REMOTE_HOME": str(self.home),
            "GX10_HOST": HOST,
            "GX10_PYTHON": sys.executable,
            "GX10_PIP_ARGS": "--no-deps --no-build-isolation --no-index",
            "GX10_ALIVE_WAIT": "1",
            "GX10_MIN_FREE_GB": "1",
            "EVIDENCE_DIR": str(self.evidence),
        }

    def dispatch(self, *args: str, timeout: float = 300, **env: str):
        self.log.unlink(missing_ok=True)
        return subprocess.run(
            [str(SCRIPT), *args],
            env={**self.env, **env},
            cwd=self.local,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def ssh_calls(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []

    def run_dir(self, name: str, prefix: str = "apr-dispatch/runs") -> Path:
        return self.home / prefix / name

    def markers(self) -> list[Path]:
        return sorted(self.root.rglob("PWNED*"))


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """One remote per module, so the project is synced and installed there once."""
    return Remote(tmp_path_factory.mktemp("dispatch"))


def commit_of(stdout: str) -> str:
    return re.search(r"^commit: ([0-9a-f]{40})$", stdout, re.M).group(1)


def write_shards(folder: Path) -> None:
    """Two raw shards: little-endian uint32 ids below 512, the tiny presets' vocab."""
    folder.mkdir(parents=True)
    ids = (np.arange(3000, dtype=np.uint32) * 7) % 512
    ids[:1500].astype("<u4").tofile(folder / "part-000.bin")
    ids[1500:].astype("<u4").tofile(folder / "part-001.bin")
    (folder / "README.txt").write_text("not a shard")


def read_evidence(folder: Path) -> tuple[dict, list[str]]:
    """The fetched manifest and victory log; nothing else may be in the folder."""
    assert sorted(p.name for p in folder.iterdir()) == ["dispatch.json", "launch-victory.txt"]
    manifest = json.loads((folder / "dispatch.json").read_text())
    return manifest, (folder / "launch-victory.txt").read_text().splitlines()


def assert_victory_log(lines: list[str], steps: int) -> None:
    step_lines = [line for line in lines if line.startswith("step ")]
    assert [int(re.match(r"step +(\d+)/", line).group(1)) for line in step_lines] == list(
        range(1, steps + 1)
    )
    assert all(f"/{steps} loss=" in line for line in step_lines)
    assert re.search(
        rf"^Distillation complete: initial_loss=[\d.]+ -> final_loss=[\d.]+ \({steps} steps, ",
        lines[-2],
    )
    assert lines[-1].startswith("Output: ")


def test_help_prints_usage():
    out = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.startswith("Usage:")
    for var in ("GX10_HOST", "DATASET_DIR", "EXTRA_ARGS", "DETACH", "DRY_RUN", "fetch NAME"):
        assert var in out.stdout


@pytest.mark.slow
def test_synthetic_dispatch_follows_the_run_and_fetches_evidence(remote):
    env = {
        **SMALL_RUN,
        "TEACHER": "tiny-teacher",
        "STUDENT": "tiny-student",
        "LR": "0.004",
        "TEMPERATURE": "2.5",
        "ALPHA": "0.6",
        "EXTRA_ARGS": "--teacher-warmup 5 --device cpu --seed 3",
        "RUN_NAME": "synthetic",
        "GX10_USER": "tester",
        "GX10_SSH_OPTS": "-o StrictHostKeyChecking=accept-new",
        "GX10_REMOTE_ENV": "HF_HUB_OFFLINE=1 APR_DISPATCH_MARK=a;b",
    }
    out = remote.dispatch(**env)
    assert out.returncode == 0, out.stdout + out.stderr
    commit = commit_of(out.stdout)
    for line in (
        f"target: tester@{HOST}:~/apr-dispatch (python: {remote.env['GX10_PYTHON']})",
        "teacher: tiny-teacher",
        "student: tiny-student",
        "steps: 20",
        "hyperparameters: seq_len=16 batch_size=4 lr=0.004 temperature=2.5 alpha=0.6",
        "extra args: --teacher-warmup 5 --device cpu --seed 3",
        "run name: synthetic -> ~/apr-dispatch/runs/synthetic",
        "dataset: (synthetic)",
    ):
        assert line in out.stdout.splitlines()
    assert "warning: no GPU visible" in out.stderr
    assert "step 20/20" in out.stdout  # the log was followed
    calls = remote.ssh_calls()
    # Options end before the destination, whatever GX10_SSH_OPTS holds.
    assert all(f" -- tester@{HOST} " in call for call in calls)
    assert all("StrictHostKeyChecking=accept-new" in call for call in calls)

    manifest, victory = read_evidence(remote.evidence / "synthetic")
    run_dir = remote.run_dir("synthetic")
    assert manifest["status"] == "completed"
    assert manifest["remote_host"] == HOST
    assert manifest["remote_run_dir"] == str(run_dir.resolve())
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", manifest["dispatched_at"])
    assert manifest["dispatched_commit"] == commit
    hp = manifest["hyperparameters"]
    assert (hp["steps"], hp["seq_len"], hp["batch_size"], hp["seed"]) == (20, 16, 4, 3)
    assert (hp["lr"], hp["temperature"], hp["alpha"]) == (0.004, 2.5, 0.6)
    assert manifest["teacher"]["spec"] == "tiny-teacher"
    assert manifest["student"]["spec"] == "tiny-student"
    assert manifest["teacher_warmup_steps"] == 5
    assert manifest["data"]["kind"] == "synthetic"
    assert manifest["steps"] == 20
    # apr ran from the synced commit's venv, not from this checkout.
    venv_apr = remote.home / "apr-dispatch" / "commits" / commit / ".venv" / "bin" / "apr"
    assert manifest["command"][0] == str(venv_apr)
    assert victory[0] == "dataset: (synthetic)"
    assert_victory_log(victory, 20)
    launch = (run_dir / "launch.sh").read_text()
    assert "export APR_DISPATCH_MARK=a\\;b" in launch
    assert (run_dir / "launch.exit").read_text().strip() == "0"


@pytest.mark.slow
def test_dataset_dispatch_detached_then_fetched(remote):
    """A dataset dir whose name tries quotes, `;` and $(...) trains on its shards, runs nothing."""
    name = "corpus dir; touch PWNED $(touch PWNED2) `touch PWNED3` 'q' \"dq\""
    write_shards(remote.home / "data" / name)
    prefix = "runs with space"
    env = {
        **SMALL_RUN,
        "DATASET_DIR": f"~/data/{name}",
        "GX10_RUN_PREFIX": f"~/{prefix}",
        "RUN_NAME": "dataset",
        "DETACH": "1",
    }
    out = remote.dispatch(**env)
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = remote.run_dir("dataset", prefix)
    request_stop = run_dir / "launch.pid"
    try:
        assert f"dataset: ~/data/{name} (real corpus via --dataset)" in out.stdout.splitlines()
        assert "dataset: 2 shards" in out.stdout
        assert "detached:" in out.stdout
        assert not (run_dir / "launch.exit").exists()  # returned while the run goes on
        deadline = time.monotonic() + 240
        while not (run_dir / "launch.exit").exists():
            assert time.monotonic() < deadline, "the detached run did not finish"
            time.sleep(1)
    finally:
        if not (run_dir / "launch.exit").exists() and request_stop.exists():
            os.killpg(int(request_stop.read_text()), signal.SIGTERM)
    assert (run_dir / "launch.exit").read_text().strip() == "0"
    assert not (remote.evidence / "dataset").exists()

    out = remote.dispatch("fetch", "dataset", GX10_RUN_PREFIX=f"~/{prefix}")
    assert out.returncode == 0, out.stdout + out.stderr
    manifest, victory = read_evidence(remote.evidence / "dataset")
    dataset = remote.home / "data" / name
    assert manifest["status"] == "completed"
    assert manifest["remote_run_dir"] == str(run_dir.resolve())
    assert manifest["dispatched_at"] and manifest["remote_host"] == HOST
    assert manifest["data"]["kind"] == "shards"
    assert manifest["data"]["path"] == str(dataset)
    assert (manifest["data"]["files"], manifest["data"]["tokens"]) == (2, 3000)
    assert victory[0] == f"dataset: {dataset} (real corpus via --dataset)"
    assert_victory_log(victory, 20)
    assert remote.markers() == []


@pytest.mark.slow
def test_sigint_to_a_detached_run_marks_it_interrupted(remote):
    """The hint the launch prints (kill -INT -- -PID) stops apr cleanly, though it runs detached."""
    out = remote.dispatch(**{**SMALL_RUN, "STEPS": "100000"}, RUN_NAME="stopped", DETACH="1")
    assert out.returncode == 0, out.stdout + out.stderr
    run_dir = remote.run_dir("stopped")
    pid = int((run_dir / "launch.pid").read_text())
    assert f"kill -INT -- -{pid}" in out.stdout
    try:
        deadline = time.monotonic() + 120
        # A distillation step line, not a warm-up line ("teacher warm-up: step 1/5 ...").
        while not re.search(r"^step ", (run_dir / "launch.log").read_text(), re.M):
            assert time.monotonic() < deadline, "the run never reached its first step"
            time.sleep(0.5)
        os.killpg(pid, signal.SIGINT)
        while not (run_dir / "launch.exit").exists():
            assert time.monotonic() < deadline, "the run ignored SIGINT"
            time.sleep(0.5)
    finally:
        if not (run_dir / "launch.exit").exists():
            os.killpg(pid, signal.SIGKILL)
    assert (run_dir / "launch.exit").read_text().strip() == "130"
    out = remote.dispatch("fetch", "stopped")
    assert out.returncode == 0, out.stdout + out.stderr
    manifest, victory = read_evidence(remote.evidence / "stopped")
    assert manifest["status"] == "interrupted"
    assert victory[-1].startswith("interrupted: interrupted by SIGINT after step ")
    assert victory[-2].startswith("step ")


@pytest.mark.parametrize(
    "dataset",
    [
        "x; touch {marker}",
        "$(touch {marker})",
        "`touch {marker}`",
        "'; touch {marker}; echo '",
        '"; touch {marker}; echo "',
        "x\ntouch {marker}",
        "~/$(touch {marker})",
    ],
)
def test_injection_in_dataset_dir_runs_nothing(remote, dataset):
    marker = remote.root / "PWNED-injection"
    out = remote.dispatch(**SMALL_RUN, DATASET_DIR=dataset.format(marker=marker), RUN_NAME="inj")
    assert out.returncode == 1
    assert "is not a directory" in out.stderr
    assert "nothing was launched" in out.stderr
    assert len(remote.ssh_calls()) == 1  # preflight only: no sync, no launch
    assert not remote.run_dir("inj").exists()
    assert remote.markers() == []


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATASET_DIR": "~/no/such/corpus"}, "DATASET_DIR "),
        ({"DATASET_DIR": "~/empty-corpus"}, "holds no *.bin shards; nothing was launched"),
        ({"GX10_MIN_FREE_GB": "999999999"}, "GiB free under"),
        ({"GX10_HOST": "unreachable-box"}, "cannot reach unreachable-box over ssh"),
    ],
    ids=["missing-dataset", "no-shards", "disk", "unreachable"],
)
def test_preflight_fails_before_anything_is_sent(remote, env, message):
    (remote.home / "empty-corpus").mkdir(exist_ok=True)
    (remote.home / "empty-corpus" / "notes.txt").write_text("no shards here")
    out = remote.dispatch(**SMALL_RUN, RUN_NAME="refused", **env)
    assert out.returncode == 1
    assert message in out.stderr
    if env.get("DATASET_DIR") == "~/no/such/corpus":
        expected = f"DATASET_DIR {remote.home}/no/such/corpus is not a directory on "
        assert expected in out.stderr
    assert len(remote.ssh_calls()) == 1
    assert not remote.run_dir("refused").exists()


def test_existing_run_name_is_refused(remote):
    remote.run_dir("taken").mkdir(parents=True)
    out = remote.dispatch(**SMALL_RUN, RUN_NAME="taken")
    assert out.returncode == 1
    assert "already exists; choose another RUN_NAME" in out.stderr
    assert list(remote.run_dir("taken").iterdir()) == []


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("GX10_HOST", "-oProxyCommand=touch {marker}"),
        ("GX10_HOST", "box -oProxyCommand=touch {marker}"),
        ("GX10_HOST", "box\n-oProxyCommand=touch {marker}"),
        ("GX10_HOST", "someone@box"),
        ("GX10_USER", "-oProxyCommand=touch {marker}"),
        ("GX10_USER", "me@other-box"),
    ],
)
@pytest.mark.parametrize("command", [[], ["fetch", "some-run"]], ids=["dispatch", "fetch"])
def test_host_or_user_that_is_not_a_name_is_refused_before_ssh(remote, var, value, command):
    """A host such as -oProxyCommand=... would land in ssh's option position."""
    value = value.format(marker=remote.root / "PWNED-host")
    out = remote.dispatch(*command, **SMALL_RUN, RUN_NAME="hostile", **{var: value})
    assert out.returncode == 1
    assert len(out.stderr.splitlines()) == 1
    assert out.stderr.startswith(f"error: {var} ")
    assert " is not a " in out.stderr
    assert out.stdout == ""
    assert remote.ssh_calls() == []
    assert remote.markers() == []


def test_bad_run_name_fails_before_ssh(remote):
    out = remote.dispatch(RUN_NAME="../escape")
    assert out.returncode == 1
    assert "RUN_NAME '../escape'" in out.stderr
    assert remote.ssh_calls() == []


def test_dry_run_prints_every_command_and_runs_nothing(remote):
    before = sorted(remote.home.rglob("*"))
    out = remote.dispatch(
        **SMALL_RUN, DRY_RUN="1", RUN_NAME="dry", DATASET_DIR="~/x; touch PWNED", LR="0.01"
    )
    assert out.returncode == 0, out.stderr
    assert remote.ssh_calls() == []
    assert sorted(remote.home.rglob("*")) == before
    assert not (remote.evidence / "dry").exists()
    # preflight, sync, install, launch, follow, and two for fetch
    assert out.stdout.count(f"ssh {HOST} bash -c:") == 7
    assert f"archive --format=tar {commit_of(out.stdout)} | ssh {HOST} bash -c:" in out.stdout
    assert "nohup setsid env --default-signal=INT bash" in out.stdout
    assert (
        "/.venv/bin/apr distill --steps 20 --seq-len 16 --batch-size 4 --lr 0.01 "
        '--dataset "$HOME"/x\\;\\ touch\\ PWNED --teacher-warmup 5 --device cpu '
        '--out "$HOME"/apr-dispatch/runs/dry'
    ) in out.stdout


def test_several_gpus_launch_under_torchrun(remote):
    out = remote.dispatch(**SMALL_RUN, DRY_RUN="1", RUN_NAME="multi", GX10_NPROC="4")
    assert out.returncode == 0, out.stderr
    assert (
        "/.venv/bin/python -m torch.distributed.run --standalone --nproc-per-node=4 "
        "-m apr_cli distill --steps 20"
    ) in out.stdout
    bad = remote.dispatch(**SMALL_RUN, DRY_RUN="1", RUN_NAME="multi", GX10_NPROC="two")
    assert bad.returncode == 1 and "GX10_NPROC" in bad.stderr


@pytest.mark.slow
def test_run_that_dies_early_shows_its_log(remote):
    out = remote.dispatch(
        **{**SMALL_RUN, "EXTRA_ARGS": "--no-such-option"}, RUN_NAME="early", GX10_ALIVE_WAIT="120"
    )
    assert out.returncode == 1
    assert "the run exited early (exit 2)" in out.stderr
    assert "No such option" in out.stderr
    assert not (remote.evidence / "early").exists()


def test_fetch_of_unknown_run_says_so(remote):
    out = remote.dispatch("fetch", "never-ran")
    assert out.returncode == 1
    assert "no dispatch.json in" in out.stderr
    assert not (remote.evidence / "never-ran").exists()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_is_shellcheck_clean():
    out = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
