"""The run directory: manifest, victory log, metrics and artifacts of one run."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from apr_cli.distill.pipeline import StepMetrics
from apr_cli.distill.plot import LossHistory
from apr_cli.errors import AprError
from apr_cli.fsutil import atomic_write_bytes, atomic_write_json

MANIFEST = "dispatch.json"
VICTORY_LOG = "launch-victory.txt"
METRICS = "metrics.jsonl"
LOSS_PLOT = "loss.png"
STUDENT_DIR = "student-trained.apr"
# Everything a run writes; --overwrite clears exactly these.
ARTIFACTS = (
    MANIFEST,
    VICTORY_LOG,
    METRICS,
    LOSS_PLOT,
    STUDENT_DIR,
    "checkpoints",
    "teacher-warmed.apr",
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
        f"step {m.step:>{width}}/{m.steps} loss={m.loss:.4f}{terms} lr={m.lr:.2e} "
        f"tok/s={m.tokens_per_s:.0f} sec/step={m.sec_per_step:.3f}"
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

    @classmethod
    def create(cls, path: Path, overwrite: bool = False, writable: bool = True) -> RunDirectory:
        """A fresh run directory; refuses one that already holds a run unless `overwrite`."""
        run = cls(path, writable)
        if not writable:
            return run
        if run.path.exists() and not run.path.is_dir():
            raise AprError(f"--out {run.path}: exists and is not a directory")
        previous = run.read_manifest()
        if previous is not None and not overwrite:
            status = previous.get("status", "unknown")
            if status == "running":  # or killed before it could say otherwise: never advise
                raise AprError(  # overwriting what may still be going
                    f"--out {run.path}: holds a run that is still running (or was killed "
                    f"without finishing); continue it with --resume {run.path} once it has "
                    "stopped, or choose another --out"
                )
            raise AprError(
                f"--out {run.path}: already holds a {status} run; "
                "pass --overwrite to replace it or choose another --out"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in ARTIFACTS:
                target = run.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        return run

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def student_dir(self) -> Path:
        return self.path / STUDENT_DIR

    def read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.is_file():
            return None
        try:
            return json.loads(self.manifest_path.read_text())
        except json.JSONDecodeError:
            return {"status": "unreadable"}

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        if not self.writable:
            return
        atomic_write_json(self.manifest_path, manifest)

    def log(self, line: str) -> None:
        """Append one line to the victory log, flushed so a crash keeps it."""
        if not self.writable:
            return
        with open(self.path / VICTORY_LOG, "a") as f:
            f.write(line + "\n")

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
        if not self.writable:
            return
        record = asdict(metrics)
        record.pop("steps")
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")

    def loss_history(self, with_teacher: bool) -> LossHistory:
        """The steps in metrics.jsonl and the resumes in the manifest, for loss.png."""
        path = self.path / METRICS
        lines = path.read_text().splitlines() if path.exists() else []
        records = [json.loads(line) for line in lines if step_of(line) != float("inf")]
        resumed = (self.read_manifest() or {}).get("resumed", [])
        return LossHistory(
            steps=[r["step"] for r in records],
            loss=[r["loss"] for r in records],
            ce=[r["ce_loss"] for r in records],
            kd=[r["kd_loss"] for r in records] if with_teacher else None,
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
