"""The run directory: manifest, victory log, metrics and artifacts of one run."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from apr_cli.distill.checkpoints import CHECKPOINT_DIR
from apr_cli.distill.pipeline import StepMetrics
from apr_cli.distill.plot import LossHistory
from apr_cli.errors import AprError
from apr_cli.fsutil import append_text, atomic_write_bytes, atomic_write_json

MANIFEST = "dispatch.json"
VICTORY_LOG = "launch-victory.txt"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
STUDENT_DIR = "student-trained.apr"
LOCK = ".lock"  # flock'ed while a run writes here; holds "pid N on HOST"
# Everything a run writes; --overwrite clears exactly these.
ARTIFACTS = (
    MANIFEST,
    VICTORY_LOG,
    METRICS,
    LOSS_PLOT,
    STUDENT_DIR,
    CHECKPOINT_DIR,
    "teacher-warmed.apr",
    "config.yaml",
    "student-best.apr",
    "tensorboard",
    "wandb",
)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_run_dir(prefix: str = "distill", claim: bool = True) -> Path:
    """runs/PREFIX-YYYYMMDD-HHMMSS in UTC, with -2, -3, ... for runs started in the same second.

    `claim` creates the directory, so two runs never pick the same one; torchrun's other ranks
    (which write nothing) only name it.
    """
    base = Path("runs") / f"{prefix}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    if not claim:
        return base
    base.parent.mkdir(parents=True, exist_ok=True)
    path, n = base, 1
    while True:
        try:
            path.mkdir()  # atomic: exactly one run gets each name
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def format_step(m: StepMetrics, with_teacher: bool = True) -> str:
    """The one line a step leaves in the terminal and in the victory log.

    Without a teacher the loss is the CE alone: no kd and ce columns.
    """
    width = len(str(m.steps))
    terms = f" kd={m.kd_loss:.4f} ce={m.ce_loss:.4f}" if with_teacher else ""
    line = (
        f"step {m.step:>{width}}/{m.steps} loss={m.loss:.4f}{terms} "
        f"{'' if m.aux_loss is None else f'aux={m.aux_loss:.4f} '}"
        f"lr={m.lr:.2e} tok/s={m.tokens_per_s:.0f} sec/step={m.sec_per_step:.3f}"
    )
    if m.kind is not None:  # a run that samples: what this step trained on
        line += f" kind={m.kind} gen={m.generated:.1f} sample_s={m.sample_s:.3f}"
    return line


def step_of(metrics_line: str) -> float:
    """The step a metrics line records; a line torn by a crash counts as past any step."""
    try:
        return json.loads(metrics_line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return float("inf")


class RunDirectory:
    """One run's files. The manifest is rewritten atomically; logs are appended and flushed.

    Under data parallelism only rank 0's RunDirectory is `writable`; the others write nothing.
    """

    def __init__(self, path: Path, writable: bool = True):
        self.path = Path(path)
        self.writable = writable
        self.lock_fd: int | None = None

    @classmethod
    def create(cls, path: Path, overwrite: bool = False, writable: bool = True) -> RunDirectory:
        """A fresh, locked run directory; refuses one that holds a run unless `overwrite`.

        The old run is deleted here, when the new one has passed every check and is about to
        write its manifest.
        """
        run = cls(path, writable)
        if not writable:
            return run
        if run.path.exists() and not run.path.is_dir():
            raise AprError(f"--out {run.path}: exists and is not a directory")
        run.path.mkdir(parents=True, exist_ok=True)
        run.lock("--out")
        try:
            previous = run.read_manifest()
            if previous is not None and not overwrite and previous["status"] == "running":
                raise AprError(  # or killed unfinished: never advise overwriting it
                    f"--out {run.path}: holds a run that is still running (or was killed "
                    f"without finishing); continue it with --resume {run.path} once it has "
                    "stopped, or choose another --out"
                )
            if previous is not None and not overwrite:
                raise AprError(
                    f"--out {run.path}: already holds a run (status {previous['status']}); "
                    "pass --overwrite to replace it or choose another --out"
                )
            for name in ARTIFACTS if overwrite else ():
                target = run.path / name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
            run.remove_temporaries()
        except BaseException:
            run.unlock()
            raise
        return run

    def lock(self, flag: str) -> None:
        """Hold an OS lock on the directory until `unlock` (or this process ends).

        flock is released by the kernel however the process ends, so a killed run leaves no
        stale lock; the file's text only names the holder for the refusal below.
        """
        if not self.writable:
            return
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise AprError(
                f"{flag} {self.path}: in use by another apr run ({holder}); "
                "wait for it to end or choose another --out"
            ) from None
        self.lock_fd = fd
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        except OSError:
            pass  # a full disk: the lock holds all the same, only the holder goes unnamed

    def unlock(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # closing the file releases the flock
            self.lock_fd = None

    def remove_temporaries(self) -> None:
        """Delete what a killed run left half-written: temp files and temp model folders.

        Only safe while holding the lock: another run's temporaries would be live.
        """
        if not self.writable:
            return  # another rank's: rank 0 may be writing them right now
        prefixes = tuple(f".{name}." for name in ARTIFACTS) + (".step-",)
        for folder in (self.path, self.path / CHECKPOINT_DIR):
            for entry in folder.iterdir() if folder.is_dir() else ():
                if not entry.name.startswith(prefixes):
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def student_dir(self) -> Path:
        return self.path / STUDENT_DIR

    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest; None when there is none, {"status": "unreadable"} when it is broken."""
        if not os.path.lexists(self.manifest_path):
            return None
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):  # a directory, not UTF-8, ...
            return {"status": "unreadable"}
        if not isinstance(manifest, dict) or not isinstance(manifest.get("status"), str):
            return {"status": "unreadable"}
        return manifest

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        if not self.writable:
            return
        atomic_write_json(self.manifest_path, manifest)

    def log(self, line: str) -> None:
        """Append one line to the victory log, flushed so a crash keeps it."""
        if not self.writable:
            return
        append_text(self.path / VICTORY_LOG, line + "\n")

    def log_size(self) -> int:
        path = self.path / VICTORY_LOG
        return path.stat().st_size if path.exists() else 0

    def truncate_logs(self, log_bytes: int, steps: int) -> None:
        """Cut the log and metrics back to a checkpoint: steps after it will be run again."""
        if not self.writable:
            return
        log = self.path / VICTORY_LOG
        if log.exists():
            atomic_write_bytes(log, log.read_bytes()[:log_bytes])
        metrics = self.path / METRICS
        if metrics.exists():
            lines = metrics.read_text().splitlines(keepends=True)
            kept = [line for line in lines if step_of(line) <= steps]
            atomic_write_bytes(metrics, "".join(kept).encode())

    def append_metrics(self, metrics: StepMetrics) -> None:
        record = asdict(metrics)
        record.pop("steps")
        if record["aux_loss"] is None:  # a dense student has no router
            record.pop("aux_loss")
        if record["kind"] is None:  # a run that never samples has no sampling columns
            for key in ("kind", "generated", "sample_s"):
                record.pop(key)
        self.append_record(record)

    def append_record(self, record: dict[str, Any]) -> None:
        """One JSON line in metrics.jsonl (a step, or an eval marked `"kind": "eval"`)."""
        if not self.writable:
            return
        append_text(self.path / METRICS, json.dumps(record) + "\n")

    def loss_history(self, with_teacher: bool) -> LossHistory:
        """The steps and evals in metrics.jsonl and the resumes in the manifest, for loss.png."""
        path = self.path / METRICS
        lines = path.read_text().splitlines() if path.exists() else []
        rows = [json.loads(line) for line in lines if step_of(line) != float("inf")]
        records = [r for r in rows if r.get("kind") != "eval"]
        resumed = (self.read_manifest() or {}).get("resumed", [])
        return LossHistory(
            steps=[r["step"] for r in records],
            loss=[r["loss"] for r in records],
            ce=[r["ce_loss"] for r in records],
            kd=[r["kd_loss"] for r in records] if with_teacher else None,
            validation=[(r["step"], r["val_loss"]) for r in rows if r.get("kind") == "eval"],
            resumes=[r["from_step"] for r in resumed],
            title=f"{self.path.name}: loss per step",
        )

    def artifact_paths(self) -> dict[str, str]:
        names = {
            "manifest": MANIFEST,
            "victory_log": VICTORY_LOG,
            "metrics": METRICS,
            "loss_plot": LOSS_PLOT,
            "student": STUDENT_DIR,
        }
        return {key: str(self.path / name) for key, name in names.items()}
