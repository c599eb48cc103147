"""The one interface the training loop pulls batches through, and the synthetic source."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from apr_cli.errors import AprError


@runtime_checkable
class BatchSource(Protocol):
    """Where batches come from. Stateful sources save and restore their position exactly."""

    def next_batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels), both int64 of shape (batch_size, seq_len)."""
        ...

    def reset(self) -> None:
        """Go back to the first batch."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def describe(self) -> dict[str, Any]:
        """What the manifest records about this source (kind, path, token counts...)."""
        ...


class SyntheticBatchSource:
    """Row i is `seq_len` copies of token `i % vocab_size`; labels equal inputs.

    Stateless: every call returns the same batch, so any model can learn it (a smoke test).
    Under data parallelism rank r holds rows r, r + world_size, ... of the global batch.
    """

    def __init__(self, vocab_size: int, rank: int = 0, world_size: int = 1):
        if vocab_size <= 0:
            raise AprError(f"synthetic vocab_size must be positive, got {vocab_size}")
        self.vocab_size, self.rank, self.world_size = vocab_size, rank, world_size

    def next_batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        global_rows = torch.arange(batch_size, dtype=torch.int64) * self.world_size + self.rank
        rows = global_rows % self.vocab_size  # (B,)
        inputs = rows[:, None].expand(batch_size, seq_len).contiguous()  # (B, T)
        return inputs, inputs.clone()

    def reset(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def describe(self) -> dict[str, Any]:
        return {"kind": "synthetic", "vocab_size": self.vocab_size}
