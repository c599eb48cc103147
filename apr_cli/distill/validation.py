"""Validation during training: held-out loss and agreement with the teacher every N steps."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

from torch import nn

from apr_cli.data.shards import ShardBatchSource
from apr_cli.distill.backend import Backend
from apr_cli.distill.evaluate import score_windows, window_indices
from apr_cli.model.qwen2 import Qwen2ForCausalLM


@contextlib.contextmanager
def gathered(wrapped: nn.Module) -> Iterator[None]:
    """Under FSDP2, gather the root's shards so the student can run outside the wrapper."""
    if not hasattr(wrapped, "unshard"):
        yield
        return
    wrapped.unshard()
    try:
        yield
    finally:
        wrapped.reshard()


class Validator:
    """Scores the student on the same held-out windows at every eval; stateful for resume.

    Every rank scores every window (FSDP2 needs all ranks in each forward); rank 0 reports.
    Scoring reads windows by index and draws no random numbers, so training is unchanged.
    """

    def __init__(
        self,
        source: ShardBatchSource,
        *,
        every: int,
        windows: int,
        seq_len: int,
        batch_size: int,
        backend: Backend,
    ):
        self.source, self.every, self.seq_len = source, every, seq_len
        self.batch_size, self.backend = batch_size, backend
        self.picks = window_indices(source.check_seq_len(seq_len), windows)
        self.history: list[dict[str, Any]] = []  # one eval row per eval, in step order
        self.teacher_loss: float | None = None  # scored once, at the first eval

    def due(self, step: int, steps: int) -> bool:
        """Every `every` steps and after the last one."""
        return step % self.every == 0 or step == steps

    def run(
        self,
        step: int,
        student: Qwen2ForCausalLM,
        teacher: Qwen2ForCausalLM | None,
        wrapped: nn.Module,
    ) -> dict[str, Any]:
        """Score the student (and its agreement with the teacher) now; the eval row."""
        with gathered(wrapped):
            scores = score_windows(
                student,
                self.source,
                self.picks,
                seq_len=self.seq_len,
                batch_size=self.batch_size,
                backend=self.backend,
                teacher=teacher,
                teacher_loss=teacher is not None and self.teacher_loss is None,
            )
        if scores.teacher_loss is not None:
            self.teacher_loss = scores.teacher_loss
        row: dict[str, Any] = {
            "step": step,
            "kind": "eval",
            "val_loss": scores.loss,
            "val_perplexity": math.exp(scores.loss),
        }
        if teacher is not None:
            row.update(kl_to_teacher=scores.kl_to_teacher, top1_agreement=scores.top1_agreement)
        self.history.append(row)
        return row

    def is_best(self, row: dict[str, Any]) -> bool:
        """True when `row` has the lowest val loss so far (the first of equals wins)."""
        return self.best() is row

    def best(self) -> dict[str, Any]:
        return min(self.history, key=lambda r: r["val_loss"])

    def summary(self) -> dict[str, Any]:
        """The manifest's `validation` entry."""
        summary: dict[str, Any] = {
            "windows": len(self.picks),
            "tokens": len(self.picks) * self.seq_len,
            "every": self.every,
            "evals": len(self.history),
            "teacher_val_loss": self.teacher_loss,
        }
        if self.history:
            best = self.best()
            summary.update(
                final_val_loss=self.history[-1]["val_loss"],
                best_val_loss=best["val_loss"],
                best_step=best["step"],
            )
        return summary

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(r) for r in self.history], "teacher_loss": self.teacher_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [dict(r) for r in state["history"]]
        self.teacher_loss = state["teacher_loss"]


def format_eval(row: dict[str, Any], steps: int, teacher_loss: float | None) -> str:
    """The victory log's line for one eval."""
    width = len(str(steps))
    line = f"eval {row['step']:>{width}}/{steps} val_loss={row['val_loss']:.4f}"
    if "kl_to_teacher" in row:
        line += f" kl_to_teacher={row['kl_to_teacher']:.4f} top1={row['top1_agreement']:.3f}"
    if teacher_loss is not None:
        line += f" (teacher val_loss={teacher_loss:.4f})"
    return line
