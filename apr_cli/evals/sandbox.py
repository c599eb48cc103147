"""Run untrusted Python programs contained, in parallel, and say how each one ended.

Each program runs in its own session, in a fresh empty temp directory (its cwd, HOME and
TMPDIR), under CPU-time, address-space, file-size, open-file and process-count limits and a
wall-clock timeout, with stdout and stderr thrown away. Where the OS allows, it also gets a new
network namespace (no interfaces but a downed loopback) and a new pid namespace (killing its
first process kills every process it started). As root, it runs as a dedicated unprivileged uid
per worker: the kernel does not enforce RLIMIT_NPROC for root, and root could write anywhere.
`probe_isolation` measures what this machine allows; the report records it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from queue import SimpleQueue

from apr_cli.errors import AprError

# Runs first in the sandbox, before any program code: lowers the limits (an unprivileged
# process may), reads the program from stdin, runs it and writes how it ended to the result fd.
# A program that exits on its own (sys.exit, os._exit, a signal) writes no "passed".
WRAPPER = r"""
import os, resource, sys
fd = int(sys.argv[1])
for name, value in zip(("CPU", "AS", "FSIZE", "NOFILE", "NPROC"), sys.argv[2:7]):
    res = getattr(resource, "RLIMIT_" + name)
    hard = resource.getrlimit(res)[1]
    value = int(value) if hard == resource.RLIM_INFINITY else min(int(value), hard)
    resource.setrlimit(res, (value, value))
source = sys.stdin.read()
sys.stdin.close()
try:
    exec(compile(source, "program.py", "exec"), {"__name__": "__main__"})
    result = "passed"
except BaseException as e:
    try:
        result = type(e).__name__ + ": " + str(e)[:200]
    except BaseException:
        result = "error"
os.write(fd, result.encode("utf-8", "replace")[:1000])
"""

UID_BASE = 2_000_000  # far above the uids of real accounts


@dataclass(frozen=True)
class Limits:
    """What one program may use."""

    timeout_s: float = 10.0  # wall clock; CPU time is limited to the next whole second + 1
    memory_mb: int = 1024  # address space
    file_mb: int = 16  # largest file it may write
    open_files: int = 64
    processes: int = 32  # per worker's uid (root) or on top of ours (not root)


@dataclass(frozen=True)
class Isolation:
    """What this machine allowed the sandbox, for the report."""

    python: str  # the interpreter programs run with
    python_version: str
    namespaces: bool  # new network and pid namespaces (no network; the whole tree killed)
    dedicated_uid: bool  # programs run as uid UID_BASE + ... (only when we are root)


@dataclass(frozen=True)
class Outcome:
    """How one program ended: passed, failed (an assertion), timeout or error; and detail."""

    status: str
    detail: str = ""


class Sandbox:
    """Runs programs contained, `workers` at a time (see the module docstring)."""

    def __init__(self, limits: Limits, isolation: Isolation, workers: int):
        if workers < 1:
            raise AprError(f"--workers must be >= 1, got {workers}")
        self.limits, self.isolation, self.workers = limits, isolation, workers
        # Distinct uids per evaluator process and worker, so RLIMIT_NPROC counts one program's
        # processes and a sweep by uid can only hit that program's.
        self.uid_base = UID_BASE + (os.getpid() % 50_000) * 256 + 1
        if isolation.dedicated_uid and workers > 255:
            raise AprError(f"--workers {workers}: at most 255 as root (one uid each)")

    def run_all(self, programs: Sequence[str]) -> list[Outcome]:
        """Outcomes in the order of `programs`, run `workers` at a time."""
        slots: SimpleQueue[int] = SimpleQueue()
        for slot in range(self.workers):
            slots.put(slot)

        def one(program: str) -> Outcome:
            slot = slots.get()
            try:
                return self.run(program, slot)
            finally:
                slots.put(slot)

        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(one, programs))

    def run(self, program: str, slot: int = 0) -> Outcome:
        """Run one program in worker `slot`'s identity and say how it ended."""
        uid = self.uid_base + slot if self.isolation.dedicated_uid else None
        work = tempfile.mkdtemp(prefix="apr-sandbox-")
        try:
            if uid is not None:
                os.chown(work, uid, uid)
            return self._run_in(work, program, uid)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _command(self, result_fd: int, uid: int | None) -> list[str]:
        lim = self.limits
        nproc = lim.processes if uid is not None else lim.processes + own_process_count()
        limits = [
            int(lim.timeout_s) + 1,
            lim.memory_mb << 20,
            lim.file_mb << 20,
            lim.open_files,
            nproc,
        ]
        cmd = [self.isolation.python, "-I", "-S", "-c", WRAPPER, str(result_fd)]
        cmd += [str(v) for v in limits]
        if not self.isolation.namespaces:
            return cmd
        # --kill-child: the program dies with unshare; as pid 1 of its namespace, its death
        # takes every process it started. As root, --setuid drops to the worker's uid inside.
        ns = [shutil.which("unshare") or "unshare", "--net", "--pid", "--fork", "--kill-child"]
        ns += ["--setuid", str(uid), "--setgid", str(uid)] if uid is not None else ["-r"]
        return ns + cmd

    def _run_in(self, work: str, program: str, uid: int | None) -> Outcome:
        read_end, write_end = os.pipe()
        env = {"HOME": work, "TMPDIR": work, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        as_user = {}
        if uid is not None and not self.isolation.namespaces:
            as_user = dict(user=uid, group=uid, extra_groups=[])
        try:
            proc = subprocess.Popen(
                self._command(write_end, uid),
                cwd=work,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(write_end,),
                start_new_session=True,
                **as_user,
            )
        except OSError as e:
            os.close(read_end)
            return Outcome("error", f"sandbox did not start: {e}")
        finally:
            os.close(write_end)
        timed_out = False
        try:
            proc.communicate(program.encode("utf-8", "replace"), timeout=self.limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            kill_group(proc.pid)
            if uid is not None:
                kill_uid(uid)
            proc.wait()
        # Every writer is dead now; read what is there without waiting for more.
        os.set_blocking(read_end, False)
        try:
            report = os.read(read_end, 4096).decode("utf-8", "replace")
        except BlockingIOError:
            report = ""
        finally:
            os.close(read_end)
        return classify(report, proc.returncode, timed_out, self.limits.timeout_s)


def classify(report: str, returncode: int, timed_out: bool, timeout_s: float) -> Outcome:
    """An Outcome from the wrapper's report, the exit status and whether the clock ran out."""
    if report == "passed":
        return Outcome("passed")
    if timed_out:
        return Outcome("timeout", f"over {timeout_s:g}s wall clock")
    if report:
        kind = report.split(":", 1)[0]
        return Outcome("failed" if kind == "AssertionError" else "error", report)
    if returncode < 0:
        sig = signal.Signals(-returncode)
        if sig == signal.SIGXCPU:
            return Outcome("timeout", "CPU time limit")
        return Outcome("error", f"killed by {sig.name}")
    return Outcome("error", f"exited with status {returncode} before its tests finished")


def kill_group(pgid: int) -> None:
    """SIGKILL a process group, if any of it is left."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def kill_uid(uid: int) -> None:
    """SIGKILL every process running as `uid` (a worker's own uid), including any that left
    the process group, until none is left."""
    for _ in range(100):  # a fork bomb forks while we sweep; its process limit bounds it
        pids = list(pids_of(uid))
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def pids_of(uid: int) -> Iterable[int]:
    """Live processes whose owner is `uid` (from /proc); zombies are dead and left out."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            yield int(name)


def own_process_count() -> int:
    """Processes of our uid now: RLIMIT_NPROC counts them too when we are not root."""
    return sum(1 for _ in pids_of(os.getuid()))


def probe_isolation(limits: Limits, python: str | None = None) -> Isolation:
    """The strongest isolation that runs a trivial program here, and the interpreter for it.

    As root, the interpreter must be one a dedicated uid can execute (a Python under /root is
    not): without `python`, the first of this one and the system's python3 that works.
    """
    root = os.geteuid() == 0
    if python is not None:
        candidates = [python]
    else:
        found = (shutil.which("python3", path=p) for p in ("/usr/bin", "/usr/local/bin"))
        candidates = list(dict.fromkeys([sys.executable, *filter(None, found)]))
    check = "import sys; assert sys.version_info >= (3, 8)"
    tried = []
    for namespaces in (True, False) if shutil.which("unshare") else (False,):
        for candidate in candidates:
            iso = Isolation(candidate, "", namespaces, root)
            outcome = Sandbox(limits, iso, 1).run(check)
            tried.append(
                f"{candidate} ({'namespaces' if namespaces else 'no namespaces'}): "
                f"{outcome.detail or outcome.status}"
            )
            if outcome.status == "passed":
                version = subprocess.run(
                    [candidate, "-c", "import platform; print(platform.python_version())"],
                    capture_output=True,
                    text=True,
                ).stdout.strip()
                return Isolation(candidate, version, namespaces, root)
    raise AprError("the sandbox cannot run Python here; tried " + "; ".join(tried))


def describe(isolation: Isolation, limits: Limits) -> dict:
    """The sandbox settings as they go into a summary."""
    return {**asdict(isolation), "limits": asdict(limits)}
