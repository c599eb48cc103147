"""The sandbox contains hostile completions: each is reported as a failure with its outcome,
the evaluator carries on, and nothing is written outside the program's temp dir."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from apr_cli.evals.humaneval import Problem, program
from apr_cli.evals.sandbox import Limits, Outcome, Sandbox, classify, pids_of, probe_isolation

ADD = Problem(
    "Test/0",
    'def add(a, b):\n    """The sum."""\n',
    "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "add",
)
LIMITS = Limits(timeout_s=3.0, memory_mb=512)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(LIMITS, probe_isolation(LIMITS), workers=2)


def run(sandbox: Sandbox, body: str) -> Outcome:
    """The outcome of ADD completed with `body` (indented as a function body)."""
    return sandbox.run(program(ADD, body))


def assert_no_process_left(sandbox: Sandbox) -> None:
    if sandbox.isolation.dedicated_uid:
        uids = [sandbox.uid_base + slot for slot in range(sandbox.workers)]
        assert not [pid for uid in uids for pid in pids_of(uid)]


def test_a_correct_completion_passes_and_a_wrong_one_fails(sandbox):
    assert run(sandbox, "    return a + b\n") == Outcome("passed")
    wrong = run(sandbox, "    return a - b\n")
    assert wrong.status == "failed" and wrong.detail.startswith("AssertionError")


def test_fork_bomb(sandbox):
    body = "    import os\n    while True:\n        try:\n            os.fork()\n"
    body += "        except OSError:\n            pass\n"
    start = time.monotonic()
    outcome = run(sandbox, body)
    assert outcome.status == "timeout"
    assert time.monotonic() - start < LIMITS.timeout_s + 5
    assert_no_process_left(sandbox)


def test_infinite_loop(sandbox):
    assert run(sandbox, "    while True:\n        pass\n").status == "timeout"


def test_ten_gigabyte_allocation(sandbox):
    outcome = run(sandbox, "    x = bytearray(10 * 2**30)\n    return a + b\n")
    assert outcome == Outcome("error", "MemoryError: ")


def test_writing_into_home_stays_in_the_temp_dir(sandbox, tmp_path):
    name = f"apr-escape-{uuid.uuid4().hex}"
    targets = [Path.home() / name, tmp_path / name, Path.cwd() / name]
    body = "    import os\n"
    body += f"    open(os.path.expanduser('~/{name}'), 'w').write('x')\n"
    body += "    assert os.path.exists(os.path.expanduser('~/' + " + repr(name) + "))\n"
    body += "".join(
        f"    try:\n        open({str(t)!r}, 'w').write('x')\n    except OSError:\n        pass\n"
        for t in targets
    )
    outcome = run(sandbox, body)
    assert outcome.status == "failed"  # add returned None: the write in HOME itself worked
    assert not [t for t in targets if t.exists()]


def test_killing_the_parent(sandbox):
    outcome = run(sandbox, "    import os\n    os.kill(os.getppid(), 9)\n")
    assert outcome.status != "passed"
    assert run(sandbox, "    return a + b\n").status == "passed"  # the evaluator carries on


def test_killing_its_own_process_group(sandbox):
    outcome = run(sandbox, "    import os\n    os.killpg(0, 9)\n")
    # In a pid namespace the program is pid 1, which the kernel shields from its own SIGKILL, so
    # it fails its test; without one it dies. Either way the evaluator carries on.
    assert outcome in (Outcome("failed", "AssertionError: "), Outcome("error", "killed by SIGKILL"))
    assert run(sandbox, "    return a - b\n").status == "failed"


def test_socket_to_localhost(sandbox):
    if not sandbox.isolation.namespaces:
        pytest.skip("no network namespace on this machine")
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        body = "    import socket\n"
        body += f"    socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'hi')\n"
        body += "    return a + b\n"
        outcome = run(sandbox, body)
        server.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()  # nobody connected
    assert outcome.status == "error" and "Network is unreachable" in outcome.detail


def test_closing_stdout_and_stderr(sandbox):
    outcome = run(sandbox, "    import os\n    os.close(1)\n    os.close(2)\n")
    assert outcome.status == "failed"


@pytest.mark.parametrize(
    "body, detail",
    [
        ("import sys\nsys.exit(0)\n", "SystemExit: 0"),
        ("import os\nos._exit(0)\n", "exited with status 0 before its tests finished"),
    ],
)
def test_exiting_before_the_tests_is_not_a_pass(sandbox, body, detail):
    # A correct body, then top-level code that exits before check() runs.
    assert run(sandbox, "    return a + b\n" + body) == Outcome("error", detail)


def test_printing_a_hundred_megabytes(sandbox):
    body = "    import sys\n    for _ in range(100):\n        sys.stdout.write('x' * 2**20)\n"
    start = time.monotonic()
    assert run(sandbox, body).status == "failed"
    assert time.monotonic() - start < LIMITS.timeout_s


def test_writing_a_big_file_hits_the_file_size_limit(sandbox):
    body = "    open('big', 'wb').write(b'x' * (64 << 20))\n    return a + b\n"
    outcome = run(sandbox, body)
    assert outcome.status == "error" and "File too large" in outcome.detail


def test_parallel_outcomes_keep_their_order(sandbox):
    bodies = ["    return a + b\n", "    return 0\n", "    while True:\n        pass\n"] * 2
    outcomes = sandbox.run_all([program(ADD, b) for b in bodies])
    assert [o.status for o in outcomes] == ["passed", "failed", "timeout"] * 2


def test_the_work_dir_is_fresh_and_removed(sandbox):
    body = "    import os\n    assert os.getcwd() == os.environ['HOME']\n"
    body += "    assert set(os.listdir('.')) <= {'left-behind'}\n"  # check() calls add twice
    body += "    open('left-behind', 'w').write('x')\n    return a + b\n"
    before = set(Path(os.environ.get("TMPDIR", "/tmp")).glob("apr-sandbox-*"))
    assert run(sandbox, body).status == "passed"
    assert set(Path(os.environ.get("TMPDIR", "/tmp")).glob("apr-sandbox-*")) <= before


@pytest.mark.parametrize(
    "report, returncode, timed_out, expected",
    [
        ("passed", 0, False, Outcome("passed")),
        ("passed", -9, True, Outcome("passed")),
        ("", -9, True, Outcome("timeout", "over 3s wall clock")),
        ("AssertionError: ", 0, False, Outcome("failed", "AssertionError: ")),
        ("NameError: x", 0, False, Outcome("error", "NameError: x")),
        ("", -24, False, Outcome("timeout", "CPU time limit")),
        ("", -9, False, Outcome("error", "killed by SIGKILL")),
    ],
)
def test_classify(report, returncode, timed_out, expected):
    assert classify(report, returncode, timed_out, 3.0) == expected


def test_without_unshare_the_fallback_still_contains(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no unshare to be found
    isolation = probe_isolation(LIMITS)
    assert not isolation.namespaces
    box = Sandbox(LIMITS, isolation, workers=1)
    escape = (
        "    import os, time\n    if os.fork() == 0:\n        os.setsid()\n        time.sleep(60)\n"
    )
    assert run(box, escape + "    return a + b\n").status == "passed"
    assert run(box, "    import os\n    os.kill(os.getppid(), 9)\n").status != "passed"
    assert run(box, "    while True:\n        pass\n").status == "timeout"
    assert_no_process_left(box)  # the child that left the group was swept (as root)
