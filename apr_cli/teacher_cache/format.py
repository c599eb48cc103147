"""The on-disk teacher cache: header, record layouts, shard files and fingerprints.

CACHE/
  cache.json            the header (what was built, from which teacher and dataset, the layout)
  teacher.safetensors   kind `hidden` only: the teacher's output weight `output_weight` (V, C)
  shards/NNNNNN.bin     records of windows [A + i*S, min(A + (i+1)*S, B)), raw little-endian
  shards/NNNNNN.json    the shard's index entry: windows, bytes, sha256 (written after the .bin)

A shard counts only once its entry exists and matches its file: the .bin is written to a temp
file, fsynced and renamed first, so a crash at any moment leaves nothing torn that is trusted.
docs/teacher-cache.md describes the layout for other tools.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apr_cli.data.shards import META_FILE, read_shards
from apr_cli.errors import AprError

FORMAT = "apr-teacher-cache"
VERSION = 1
HEADER = "cache.json"
TEACHER_WEIGHT = "teacher.safetensors"
SHARDS = "shards"
KINDS = ("hidden", "topk")
CACHE_DTYPES = ("bf16", "float32")
# fp16 cannot hold log(0); log-probabilities below this are stored as it (exp underflows to 0).
LOGP_FLOOR = -1.0e4
HASH_BLOCK = 1 << 24
ENDS_BYTES = 1 << 20


@dataclass(frozen=True)
class Layout:
    """What one token's record holds; the header stores it and readers rebuild the dtype."""

    kind: str  # hidden | topk
    seq_len: int
    hidden_size: int = 0  # hidden: C
    cache_dtype: str = "bf16"  # hidden: bf16 | float32
    top_k: int = 0  # topk: K
    temperature: float = 1.0  # topk: the softmax temperature of the stored log-probs
    id_dtype: str = "uint32"  # topk: uint16 when the teacher vocab fits, else uint32

    def record_dtype(self) -> np.dtype:
        """numpy dtype of one token's record (packed, little-endian)."""
        if self.kind == "hidden":
            # bf16 has no numpy dtype: its raw bits are stored as uint16 (torch views them back).
            return np.dtype(("<u2" if self.cache_dtype == "bf16" else "<f4", (self.hidden_size,)))
        ids = "<u2" if self.id_dtype == "uint16" else "<u4"
        return np.dtype(
            [("logp", "<f2", (self.top_k,)), ("tail", "<f2"), ("ids", ids, (self.top_k,))]
        )

    @property
    def bytes_per_token(self) -> int:
        return self.record_dtype().itemsize

    @property
    def bytes_per_window(self) -> int:
        return self.bytes_per_token * self.seq_len


@dataclass(frozen=True)
class Header:
    """cache.json: everything a build was asked for and what it was built from."""

    layout: Layout
    windows: tuple[int, int]  # [first, end) epoch windows of the dataset at seq_len
    windows_per_shard: int
    batch_size: int  # windows per teacher forward (part of the numerics, so fixed per cache)
    compute_dtype: str  # float32 on CPU, bfloat16 on CUDA
    teacher: dict[str, Any]  # spec, config, vocab_size, parameters, fingerprint
    dataset: dict[str, Any]  # path, tokens, windows_per_epoch, fingerprint
    teacher_weight_sha256: str | None = None  # hidden: the teacher.safetensors file

    @property
    def shards(self) -> int:
        first, end = self.windows
        return -(-(end - first) // self.windows_per_shard)

    def shard_windows(self, i: int) -> tuple[int, int]:
        """[first, end) windows of shard i."""
        first = self.windows[0] + i * self.windows_per_shard
        return first, min(first + self.windows_per_shard, self.windows[1])

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        body["windows"] = list(self.windows)
        body["bytes_per_token"] = self.layout.bytes_per_token
        body["record_dtype"] = str(self.layout.record_dtype().descr)
        return {"format": FORMAT, "version": VERSION, **body, "checksum": _checksum(body)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: Path) -> Header:
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise AprError(
                f"{source}: not an apr teacher cache header (format {FORMAT} v{VERSION})"
            )
        body = {k: v for k, v in d.items() if k not in ("format", "version", "checksum")}
        if d.get("checksum") != _checksum(body):
            raise AprError(f"{source}: checksum mismatch: the header was edited or is damaged")
        try:
            fields = {k: v for k, v in body.items() if k not in ("bytes_per_token", "record_dtype")}
            fields["layout"] = Layout(**fields["layout"])
            fields["windows"] = tuple(fields["windows"])
            return cls(**fields)
        except (KeyError, TypeError) as e:
            raise AprError(f"{source}: malformed header ({e})") from None


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def shard_paths(root: Path, i: int) -> tuple[Path, Path]:
    """(records, index entry) of shard i."""
    stem = Path(root) / SHARDS / f"{i:06d}"
    return stem.with_suffix(".bin"), stem.with_suffix(".json")


def file_sha256(path: Path) -> str:
    """sha256 of a file, streamed (never read whole)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def dataset_fingerprint(path: Path) -> dict[str, Any]:
    """Shard names and sizes, a hash of each shard's ends, and meta.json's hash.

    The ends (first and last MiB) catch a same-sized shard of other tokens without reading a
    corpus of hundreds of GB whole.
    """
    meta = Path(path) / META_FILE
    shards = [s.path for s in read_shards(path)]
    return {
        "files": [[p.name, p.stat().st_size] for p in shards],
        "ends_sha256": [ends_sha256(p) for p in shards],
        "meta_sha256": file_sha256(meta) if meta.is_file() else None,
    }


def ends_sha256(path: Path) -> str:
    """sha256 of a file's first and last ENDS_BYTES (the whole file when it is smaller)."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(ENDS_BYTES))
        f.seek(max(ENDS_BYTES, size - ENDS_BYTES))
        digest.update(f.read(ENDS_BYTES))
    return digest.hexdigest()


def describe_difference(what: str, ours: dict[str, Any], theirs: dict[str, Any]) -> str | None:
    """None when equal, else which top-level keys of two fingerprints differ."""
    keys = sorted(k for k in {*ours, *theirs} if ours.get(k) != theirs.get(k))
    return f"{what} differs in {', '.join(keys)}" if keys else None
