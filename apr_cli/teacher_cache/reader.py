"""Reading a teacher cache: checked once when opened, then memory-mapped rows by window index."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from apr_cli.distill.topk_loss import TopKTeacher
from apr_cli.errors import AprError
from apr_cli.model.vocab import shared_vocab_size
from apr_cli.teacher_cache.format import (
    HEADER,
    TEACHER_WEIGHT,
    Header,
    dataset_fingerprint,
    describe_difference,
    file_sha256,
    shard_paths,
)


def shard_problem(root: Path, header: Header, i: int, verify: bool = True) -> str | None:
    """None when shard i is complete and intact, else what is wrong with it.

    `verify` also hashes the records (streamed); without it only sizes are compared.
    """
    bin_path, entry_path = shard_paths(root, i)
    if not entry_path.is_file():
        return "missing (not built yet)"
    try:
        entry = json.loads(entry_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"index entry {entry_path.name} unreadable ({e})"
    first, end = header.shard_windows(i)
    expected = (end - first) * header.layout.bytes_per_window
    if entry.get("windows") != [first, end] or entry.get("bytes") != expected:
        return f"index entry {entry_path.name} does not match the header"
    if not bin_path.is_file():
        return f"{bin_path.name} is missing"
    size = bin_path.stat().st_size
    if size != expected:
        return f"{bin_path.name} has {size} bytes, expected {expected} (truncated or edited)"
    if verify and file_sha256(bin_path) != entry.get("sha256"):
        return f"{bin_path.name} does not match its sha256 (edited or damaged)"
    return None


class TeacherCache:
    """A built cache: `read(windows)` returns the teacher's outputs for those dataset windows.

    Opening checks the header's checksum and, with `verify`, every shard's size and hash and the
    output weight's hash, so a truncated or edited file is refused before any training.
    """

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        header_path = self.path / HEADER
        if not header_path.is_file():
            raise AprError(f"{self.path}: not a teacher cache (no {HEADER})")
        try:
            raw = json.loads(header_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AprError(f"{header_path}: unreadable ({e})") from None
        self.header = Header.from_dict(raw, header_path)
        self._maps: dict[int, np.ndarray] = {}
        if verify:
            self.verify()

    @property
    def kind(self) -> str:
        return self.header.layout.kind

    def verify(self) -> None:
        """Refuse an incomplete, truncated or edited cache, naming the first bad file."""
        for i in range(self.header.shards):
            problem = shard_problem(self.path, self.header, i)
            if problem is not None:
                raise AprError(
                    f"{self.path}: shard {i} {problem}; a cache is usable once its build has "
                    "finished (run the same build command again to complete or repair it)"
                )
        if self.kind == "hidden":
            weight = self.path / TEACHER_WEIGHT
            if not weight.is_file() or file_sha256(weight) != self.header.teacher_weight_sha256:
                raise AprError(f"{weight}: missing or does not match the header's sha256")

    def shards_done(self) -> int:
        """Shards whose entry and size are in place (hashes not checked)."""
        return sum(
            shard_problem(self.path, self.header, i, verify=False) is None
            for i in range(self.header.shards)
        )

    def output_weight(self) -> torch.Tensor:
        """The teacher's (V, C) output projection (kind hidden)."""
        try:
            with safe_open(self.path / TEACHER_WEIGHT, framework="pt") as f:
                return f.get_tensor("output_weight")
        except (SafetensorError, OSError) as e:
            raise AprError(f"{self.path / TEACHER_WEIGHT}: unreadable ({e})") from None

    def read(self, windows: Sequence[int]) -> torch.Tensor | TopKTeacher:
        """Teacher outputs of these epoch windows, in order: hidden (B, T, C) or top-k."""
        first, end = self.header.windows
        per = self.header.windows_per_shard
        rows = []
        for k in windows:
            if not first <= k < end:
                raise AprError(f"{self.path}: window {k} is outside the cached {first}..{end - 1}")
            shard, offset = divmod(k - first, per)
            rows.append(self._map(shard)[offset])
        records = np.stack(rows)  # (B, T) records
        layout = self.header.layout
        if layout.kind == "hidden":
            if layout.cache_dtype == "bf16":
                return torch.from_numpy(records.view(np.int16)).view(torch.bfloat16).float()
            return torch.from_numpy(records)  # (B, T, C)
        return TopKTeacher(
            logp=torch.from_numpy(records["logp"].astype(np.float32)),  # (B, T, K)
            tail=torch.from_numpy(records["tail"].astype(np.float32)),  # (B, T)
            ids=torch.from_numpy(records["ids"].astype(np.int64)),  # (B, T, K)
            vocab_size=self.header.teacher["vocab_size"],
        )

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self._maps:
            first, end = self.header.shard_windows(shard)
            layout = self.header.layout
            self._maps[shard] = np.memmap(
                shard_paths(self.path, shard)[0],
                dtype=layout.record_dtype(),
                mode="r",
                shape=(end - first, layout.seq_len),
            )
        return self._maps[shard]

    def check_vocab(self, student_vocab: int) -> int:
        """The vocab teacher and student share; refused when they cannot be aligned."""
        return shared_vocab_size(self.header.teacher["vocab_size"], student_vocab)

    def check_run(
        self, dataset: Path, seq_len: int, temperature: float, needed: tuple[int, int]
    ) -> None:
        """Refuse a run this cache cannot serve: another dataset, seq_len, temperature (top-k),
        or windows outside the cached range (`needed`: the lowest and highest it will read)."""
        name = f"--teacher-cache {self.path}"
        h = self.header
        difference = describe_difference(
            "the dataset", h.dataset["fingerprint"], dataset_fingerprint(dataset)
        )
        if difference is not None:
            raise AprError(
                f"{name} was built for another dataset ({h.dataset['path']}): {difference}"
            )
        if seq_len != h.layout.seq_len:
            raise AprError(f"--seq-len {seq_len}: {name} was built at seq_len {h.layout.seq_len}")
        if h.layout.kind == "topk" and temperature != h.layout.temperature:
            raise AprError(
                f"--temperature {temperature}: {name} holds log-probs at temperature "
                f"{h.layout.temperature}"
            )
        first, end = h.windows
        if needed[0] < first or needed[1] >= end:
            raise AprError(
                f"{name} covers windows {first}..{end - 1} of the dataset at seq_len {seq_len}; "
                f"this run reads windows {needed[0]}..{needed[1]}"
            )

    def describe(self) -> dict[str, Any]:
        """What `inspect` prints and a run's manifest records."""
        h = self.header
        files = [p for p in self.path.rglob("*") if p.is_file()]
        return {
            "path": str(self.path.resolve()),
            "kind": h.layout.kind,
            "layout": asdict(h.layout),
            "seq_len": h.layout.seq_len,
            "windows": list(h.windows),
            "tokens": (h.windows[1] - h.windows[0]) * h.layout.seq_len,
            "bytes_per_token": h.layout.bytes_per_token,
            "shards": h.shards,
            "shards_done": self.shards_done(),
            "size_bytes": sum(p.stat().st_size for p in files),
            "teacher": h.teacher,
            "dataset": h.dataset,
            "compute_dtype": h.compute_dtype,
            "batch_size": h.batch_size,
        }
