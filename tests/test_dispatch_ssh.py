"""scripts/dispatch-distill-gx10.sh against a real OpenSSH server on 127.0.0.1.

The `sshd` fixture starts Debian's OpenSSH server as a child of the test, on a free loopback
port, with a temporary host key, a temporary client key as the only authorized key, no password
login and a separate "remote" HOME (sshd's SetEnv; the login still starts in the user's own home,
so the tests use ~/ paths). Every process started through it carries a token in its environment;
the teardown stops sshd by its PID and fails if any such process is still alive.

The remote python is this test's own (sys.executable: /work/venv here, the repository's .venv in
CI), so the run's venv sees torch and the rest without installing them, as a GPU box's venv sees
its CUDA torch. Evidence goes into a temporary EVIDENCE_DIR, never into the repository's.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_dispatch import assert_victory_log, read_evidence, write_shards

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "dispatch-distill-gx10.sh"
RUN = {"SEQ_LEN": "16", "BATCH_SIZE": "4", "EXTRA_ARGS": "--teacher-warmup 2 --device cpu"}


@dataclass
class Sshd:
    """A running sshd and what a client needs to log in to it."""

    root: Path
    port: int
    user: str
    key: Path  # the authorized client key
    stranger_key: Path  # a key sshd does not know
    known_hosts: Path
    home: Path  # the remote HOME
    token: str  # in the environment of every process started through this sshd

    def ssh_opts(self, port: int | None = None, key: Path | None = None) -> str:
        """GX10_SSH_OPTS: only these files, no ssh config, no agent, the host key checked."""
        return (
            f"-F /dev/null -p {port or self.port} -i {key or self.key} -o IdentitiesOnly=yes "
            f"-o UserKnownHostsFile={self.known_hosts} -o GlobalKnownHostsFile=/dev/null "
            "-o StrictHostKeyChecking=yes"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_stat(pid: int) -> tuple[str, int]:
    """(state, parent pid) from /proc/PID/stat; the command name may hold spaces and ')'."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def live_processes() -> dict[int, int]:
    """pid -> parent pid of every process that has not exited (zombies excluded)."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, ppid = proc_stat(int(entry.name))
            except (OSError, IndexError):
                continue  # it exited while we looked
            if state != "Z":
                table[int(entry.name)] = ppid
    return table


def descendants(pid: int) -> set[int]:
    table = live_processes()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in table.items() if parent in frontier} - found
        found |= frontier
    return found


def carrying(token: str) -> set[int]:
    """Live processes whose environment holds the sshd's token."""
    found = set()
    for pid in live_processes():
        try:
            if token.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                found.add(pid)
        except OSError:
            continue
    return found


def describe(pids: set[int]) -> str:
    lines = []
    for pid in sorted(pids):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            cmd = "(exited)"
        lines.append(f"{pid}: {cmd.strip()}")
    return "; ".join(lines)


def start_sshd(exe: str, root: Path, config_lines: list[str]) -> tuple[subprocess.Popen, int]:
    """Start sshd on a free port; skip the module, with sshd's reason, if it cannot listen."""
    log = root / "sshd.log"
    for _ in range(3):  # a port picked free can be taken before sshd binds it
        port = free_port()
        config = root / "sshd_config"
        config.write_text("\n".join([f"Port {port}", *config_lines]) + "\n")
        check = subprocess.run([exe, "-t", "-f", str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            # As root, sshd needs /run/sshd (its service or .ci/run makes it).
            pytest.skip(f"sshd cannot start here: {check.stderr.strip()}")
        proc = subprocess.Popen([exe, "-D", "-f", str(config), "-E", str(log)])
        deadline = time.monotonic() + 20
        while proc.poll() is None and time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return proc, port
            time.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    pytest.skip(f"sshd did not listen on 127.0.0.1: {log.read_text().strip()[-300:]}")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    exe = shutil.which("sshd") or shutil.which("sshd", path="/usr/sbin:/usr/local/sbin")
    if exe is None or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        pytest.skip(
            "OpenSSH server or client not installed (Debian: apt-get install openssh-server)"
        )
    root = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key", "stranger_key"):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True
        )
    authorized = root / "authorized_keys"
    authorized.write_text((root / "client_key.pub").read_text())
    authorized.chmod(0o600)
    home = root / "remote-home"
    home.mkdir()
    user = pwd.getpwuid(os.getuid()).pw_name
    token = f"APR_TEST_SSHD={uuid.uuid4().hex}"
    proc, port = start_sshd(
        exe,
        root,
        [
            "ListenAddress 127.0.0.1",
            f"HostKey {root / 'host_key'}",
            "PidFile none",
            f"AuthorizedKeysFile {authorized}",
            "AuthenticationMethods publickey",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {user}",
            "StrictModes no",  # the temporary files live under /tmp, which is world-writable
            f"SetEnv HOME={home} {token}",
            "PermitTTY no",
            "X11Forwarding no",
            "AllowTcpForwarding no",
            "AllowAgentForwarding no",
        ],
    )
    host_key = (root / "host_key.pub").read_text().split()[:2]
    known_hosts = root / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    server = Sshd(
        root, port, user, root / "client_key", root / "stranger_key", known_hosts, home, token
    )
    try:
        probe = subprocess.run(
            ["ssh", *server.ssh_opts().split(), "-o", "BatchMode=yes", "--", f"{user}@127.0.0.1"]
            + ['echo "$HOME"'],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": os.environ["PATH"], "HOME": str(root)},
        )
        if probe.stdout.strip() != str(home):
            pytest.skip(f"cannot log in to the test sshd: {probe.stderr.strip()}")
        yield server
    finally:
        sessions = descendants(proc.pid)
        proc.terminate()
        proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while (left := {p for p in sessions if p in live_processes()} | carrying(token)) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.2)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes left behind by the ssh tests: {describe(left)}"


@pytest.fixture
def box(sshd, tmp_path):
    """Runs the script against the sshd, with its own evidence dir and local HOME."""
    return Box(sshd, tmp_path)


class Box:
    def __init__(self, sshd: Sshd, tmp: Path):
        self.sshd = sshd
        self.evidence = tmp / "evidence"
        self.local = tmp / "local"
        self.local.mkdir()
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(self.local),  # no ~/.ssh of the machine's user is read
            "LANG": "C.UTF-8",
            "EVIDENCE_DIR": str(self.evidence),
            "GX10_HOST": "127.0.0.1",
            "GX10_USER": sshd.user,
            "GX10_SSH_OPTS": sshd.ssh_opts(),
            "GX10_PYTHON": sys.executable,
            "GX10_PIP_ARGS": "--no-deps --no-build-isolation --no-index",
            "GX10_REMOTE_ENV": "HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1",
            "GX10_ALIVE_WAIT": "1",
            "GX10_MIN_FREE_GB": "1",
        }

    def command(self, *args: str, **env: str) -> dict:
        return dict(args=[str(SCRIPT), *args], env={**self.env, **env}, cwd=self.local)

    def dispatch(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            **self.command(*args, **env), capture_output=True, text=True, timeout=600
        )

    def run_dir(self, name: str) -> Path:
        return self.sshd.home / "apr-dispatch" / "runs" / name

    def venv(self) -> Path:
        return self.sshd.home / "apr-dispatch" / "commits" / head_commit() / ".venv"

    def wait_for_exit(self, name: str, timeout: float = 300) -> str:
        """The run's exit code, once its launch.sh has recorded it."""
        exit_file = self.run_dir(name) / "launch.exit"
        deadline = time.monotonic() + timeout
        while not exit_file.exists():
            assert time.monotonic() < deadline, f"run {name} did not finish"
            time.sleep(0.5)
        return exit_file.read_text().strip()


def head_commit() -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()


def assert_completed(box: Box, name: str, steps: int) -> dict:
    manifest, victory = read_evidence(box.evidence / name)
    assert manifest["status"] == "completed"
    assert manifest["remote_host"] == "127.0.0.1"
    assert manifest["dispatched_commit"] == head_commit()
    assert manifest["remote_run_dir"] == str(box.run_dir(name).resolve())
    assert manifest["steps"] == steps
    # apr ran from the synced commit's venv.
    assert manifest["command"][0] == str(box.venv() / "bin" / "apr")
    assert_victory_log(victory, steps)
    return manifest


def test_dispatch_follows_the_run_and_brings_the_evidence_back(box):
    write_shards(box.sshd.home / "shards")
    out = box.dispatch(**RUN, STEPS="5", DATASET_DIR="~/shards", RUN_NAME="followed")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"target: {box.sshd.user}@127.0.0.1:~/apr-dispatch" in out.stdout
    assert "dataset: 2 shards" in out.stdout
    assert "step 5/5" in out.stdout  # the log was followed to the end
    manifest = assert_completed(box, "followed", 5)
    assert manifest["data"]["path"] == str(box.sshd.home / "shards")
    assert (manifest["data"]["files"], manifest["data"]["tokens"]) == (2, 3000)
    assert not (REPO / "evidence" / "followed").exists()


def test_detached_dispatch_then_fetch(box):
    out = box.dispatch(**RUN, STEPS="5", RUN_NAME="detached", DETACH="1")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "detached: ~/apr-dispatch/runs/detached" in out.stdout
    assert "== follow" not in out.stdout
    assert not (box.evidence / "detached").exists()
    assert box.wait_for_exit("detached") == "0"
    out = box.dispatch("fetch", "detached")
    assert out.returncode == 0, out.stdout + out.stderr
    assert_completed(box, "detached", 5)


def test_killed_ssh_client_leaves_the_run_going(box, tmp_path):
    """The local ssh that follows the log dies mid-run: the run, in its own session, finishes."""
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with stdout.open("w") as out, stderr.open("w") as err:
        script = subprocess.Popen(
            **box.command(**RUN, STEPS="100", RUN_NAME="cut"), stdout=out, stderr=err
        )
    try:
        log = box.run_dir("cut") / "launch.log"
        deadline = time.monotonic() + 300
        follower = None
        while follower is None:
            assert script.poll() is None, stdout.read_text() + stderr.read_text()
            assert time.monotonic() < deadline, "the run never reached its first step"
            if log.exists() and "step " in log.read_text():
                follower = next(
                    (p for p in descendants(script.pid) if b"tail -n +1 -F" in cmdline(p)), None
                )
            time.sleep(0.2)
        os.kill(follower, signal.SIGKILL)
        assert script.wait(timeout=120) == 255
    finally:
        if script.poll() is None:
            script.kill()
            script.wait()
    assert "lost the connection to" in stderr.read_text()
    assert "the run goes on there" in stderr.read_text()
    assert not (box.run_dir("cut") / "launch.exit").exists()  # it was cut mid-run
    assert not (box.evidence / "cut").exists()
    assert box.wait_for_exit("cut") == "0"
    out = box.dispatch("fetch", "cut")
    assert out.returncode == 0, out.stdout + out.stderr
    assert_completed(box, "cut", 100)


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_missing_remote_dataset_fails_before_anything_is_launched(box):
    out = box.dispatch(**RUN, STEPS="5", DATASET_DIR="~/no/such/corpus", RUN_NAME="nodata")
    assert out.returncode == 1
    assert (
        f"error: DATASET_DIR {box.sshd.home}/no/such/corpus is not a directory on "
    ) in out.stderr
    assert "nothing was launched" in out.stderr
    assert "== sync" not in out.stdout
    assert not box.run_dir("nodata").exists()


@pytest.mark.parametrize("fault", ["port", "key", "host-key"])
def test_unreachable_box_fails_at_preflight_with_one_line(box, fault):
    sshd = box.sshd
    opts = {
        "port": sshd.ssh_opts(port=free_port()),
        "key": sshd.ssh_opts(key=sshd.stranger_key),
        "host-key": sshd.ssh_opts().replace(
            str(sshd.known_hosts), str(sshd.root / "known_hosts_wrong")
        ),
    }[fault]
    reason = {
        "port": "Connection refused",
        "key": "Permission denied (publickey)",
        "host-key": "Host key verification failed",
    }[fault]
    stranger = (sshd.root / "stranger_key.pub").read_text().split()[:2]
    (sshd.root / "known_hosts_wrong").write_text(f"[127.0.0.1]:{sshd.port} {' '.join(stranger)}\n")
    out = box.dispatch(**RUN, STEPS="5", RUN_NAME="unreachable", GX10_SSH_OPTS=opts)
    assert out.returncode == 1
    # One line, besides the warning about this checkout's uncommitted changes while developing.
    dirty = "warning: the working tree has uncommitted changes"
    lines = [line for line in out.stderr.splitlines() if not line.startswith(dirty)]
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: preflight: cannot reach {sshd.user}@127.0.0.1 over ssh (")
    assert reason in lines[0]
    assert "== sync" not in out.stdout
    assert not box.run_dir("unreachable").exists()


def test_second_dispatch_of_a_commit_reuses_checkout_and_venv(box):
    if not (box.venv() / ".apr-installed").exists():  # no earlier test dispatched this commit
        first = box.dispatch(**RUN, STEPS="2", RUN_NAME="reuse-1")
        assert first.returncode == 0, first.stdout + first.stderr
        assert "installed: apr " in first.stdout
    venv_files = snapshot(box.venv())
    second = box.dispatch(**RUN, STEPS="2", RUN_NAME="reuse-2")
    assert second.returncode == 0, second.stdout + second.stderr
    commit_dir = box.venv().parent
    assert f"already there: {commit_dir}" in second.stdout
    assert f"already installed: {commit_dir}/.venv" in second.stdout
    assert "installed: apr " not in second.stdout
    assert snapshot(box.venv()) == venv_files  # nothing installed, nothing rebuilt
    assert_completed(box, "reuse-2", 2)


def snapshot(folder: Path) -> dict[str, int]:
    """Every file under folder with its modification time; bytecode caches left out."""
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
