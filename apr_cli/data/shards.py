"""Token shards on disk: reading, checking and writing them, and the batch source over them."""

from __future__ import annotations

import bisect
import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apr_cli.errors import AprError
from apr_cli.fsutil import naming

# llm.c shard header: 256 little-endian int32, [magic, version, token count, unused...].
LLMC_HEADER_INTS = 256
LLMC_HEADER_BYTES = LLMC_HEADER_INTS * 4
LLMC_FORMATS = {20240520: (1, np.dtype("<u2")), 20240801: (7, np.dtype("<u4"))}
RAW_DTYPE = np.dtype("<u4")
META_FILE = "meta.json"
# Tokens per vectorised step of the id checks: 64 MB of uint32, small enough to keep RAM low.
SCAN_CHUNK = 1 << 24


@dataclass(frozen=True)
class Shard:
    """One `.bin` file: its tokens as a read-only memory map and how they are stored."""

    path: Path
    tokens: np.ndarray  # (n,) uint32 or uint16, memory-mapped
    format: str  # "raw" or "llm.c v1" / "llm.c v7"

    @property
    def token_width(self) -> int:
        return self.tokens.dtype.itemsize


def open_shard(path: Path) -> Shard:
    """Memory-map one shard, raw uint32 or llm.c (recognised by its magic), checking its size."""
    size = path.stat().st_size
    if size >= LLMC_HEADER_BYTES:
        header = np.fromfile(path, dtype="<i4", count=LLMC_HEADER_INTS)
        magic, version, count = (int(x) for x in header[:3])
        if magic in LLMC_FORMATS:
            want_version, dtype = LLMC_FORMATS[magic]
            if version != want_version:
                raise AprError(
                    f"{path}: llm.c magic {magic} with version {version}, expected {want_version}"
                )
            if size != LLMC_HEADER_BYTES + count * dtype.itemsize:
                raise AprError(
                    f"{path}: llm.c header says {count} tokens of {dtype.itemsize} bytes but the "
                    f"file has {size - LLMC_HEADER_BYTES} bytes after the header"
                )
            tokens = _memmap(path, dtype, LLMC_HEADER_BYTES, count)
            return Shard(path, tokens, f"llm.c v{version}")
    if size % RAW_DTYPE.itemsize:
        raise AprError(
            f"{path}: size {size} bytes is not a multiple of the {RAW_DTYPE.itemsize}-byte token "
            "width (raw shards are little-endian uint32)"
        )
    return Shard(path, _memmap(path, RAW_DTYPE, 0, size // RAW_DTYPE.itemsize), "raw")


def _memmap(path: Path, dtype: np.dtype, offset: int, count: int) -> np.ndarray:
    # mmap refuses empty files; an empty shard simply contributes no tokens.
    if count == 0:
        return np.empty(0, dtype=dtype)
    # A plain ndarray view of the map: slicing np.memmap itself costs microseconds of Python each.
    return np.asarray(np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)))


def read_shards(path: str | Path) -> list[Shard]:
    """Every `.bin` file in a directory, in sorted name order, memory-mapped and size-checked."""
    root = Path(path)
    if not root.is_dir():
        raise AprError(f"{root}: no such dataset directory")
    files = sorted((p for p in root.iterdir() if p.suffix == ".bin"), key=str)
    for p in files:
        if not p.is_file():  # is_file follows links: False when dangling or looping
            what = "a dangling or looping link" if p.is_symlink() else "not a regular file"
            raise AprError(f"{p}: {what} (a .bin shard must be a file; move it out of {root})")
    if not files:
        splits = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.bin")))
        hint = f" (its subdirectories {', '.join(splits)} have some: pass one)" if splits else ""
        raise AprError(f"{root}: no .bin shard files{hint}")
    return [open_shard(p) for p in files]


def read_meta(path: str | Path) -> dict[str, Any] | None:
    """The `meta.json` beside the shards, or None when there is none."""
    meta_path = Path(path) / META_FILE
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AprError(f"{meta_path}: cannot read: {e}") from None
    if not isinstance(meta, dict):
        raise AprError(f"{meta_path}: expected a JSON object")
    return meta


def write_shard(path: str | Path, tokens: Any, append: bool = False) -> None:
    """Write (or append) token ids to a raw little-endian uint32 shard."""
    ids = np.asarray(tokens)
    if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.uint32).max):
        raise AprError(f"{path}: token ids must fit in uint32")
    # f.write, not tofile: numpy reports a full disk without the OS's errno or the file.
    with naming(path), open(path, "ab" if append else "wb") as f:
        f.write(np.ascontiguousarray(ids, dtype=RAW_DTYPE).data)


def first_id_at_least(tokens: np.ndarray, limit: int) -> int | None:
    """Offset of the first token >= limit, or None; vectorised over chunks of the memory map."""
    for start in range(0, len(tokens), SCAN_CHUNK):
        chunk = tokens[start : start + SCAN_CHUNK]
        if chunk.max() >= limit:
            return start + int(np.argmax(chunk >= limit))
    return None


def id_range(tokens: np.ndarray) -> tuple[int, int] | None:
    """(min, max) token id, or None for no tokens; vectorised over chunks of the memory map."""
    if len(tokens) == 0:
        return None
    lo, hi = np.iinfo(np.int64).max, -1
    for start in range(0, len(tokens), SCAN_CHUNK):
        chunk = tokens[start : start + SCAN_CHUNK]
        lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
    return lo, hi


def check_vocab(shards: list[Shard], vocab_size: int, built_with: int | None = None) -> None:
    """Raise naming the file and offset of the first token id >= vocab_size.

    `built_with`: the vocabulary of the tokenizer the shards were built with (meta.json), named
    in the error when it is the cause.
    """
    for shard in shards:
        offset = first_id_at_least(shard.tokens, vocab_size)
        if offset is not None:
            cause = (
                f"; the shards were built with a {built_with}-token tokenizer (meta.json): "
                f"rebuild them with at most {vocab_size} tokens (e.g. --train-bpe {vocab_size}) "
                "or use a model with a larger vocabulary"
                if built_with is not None and built_with > vocab_size
                else ""
            )
            raise AprError(
                f"{shard.path}: token id {int(shard.tokens[offset])} at token offset {offset} "
                f"is >= vocab size {vocab_size}{cause}"
            )


class ShardBatchSource:
    """Batches of windows read from memory-mapped token shards, resumable and rank-striped.

    The shards are one stream of N tokens. Window k is tokens [k*seq_len, k*seq_len + seq_len + 1):
    consecutive windows share one token, so every token but the first is a label exactly once per
    epoch, and an epoch has (N - 1) // seq_len windows (the short tail is dropped). Windows are
    numbered globally across epochs; the global batch of step s is windows s*b*W + j for
    j < b*W (b the local batch size, W the world size), and rank r takes j = r, r+W, r+2W, ...
    With `shuffle`, epoch e reads its windows in a permutation seeded by (seed, e).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        vocab_size: int | None = None,
        wrap: bool = True,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
    ):
        if world_size < 1 or not 0 <= rank < world_size:
            raise AprError(f"rank {rank} and world size {world_size}: need 0 <= rank < world size")
        if vocab_size is not None and vocab_size < 1:
            raise AprError(f"vocab size must be positive, got {vocab_size}")
        self.path = Path(path).resolve()
        self.wrap, self.rank, self.world_size = wrap, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.files = read_shards(self.path)
        self.meta = read_meta(self.path)
        # Empty files hold no tokens; keeping them out of the stream keeps the lookup simple.
        self._shards = [s for s in self.files if len(s.tokens)]
        self._starts = list(itertools.accumulate((len(s.tokens) for s in self._shards), initial=0))
        self.tokens = self._starts[-1]
        if self.tokens == 0:
            raise AprError(f"{self.path}: the .bin files hold no tokens")
        self.vocab_size = vocab_size
        if vocab_size is not None:
            check_vocab(self._shards, vocab_size, (self.meta or {}).get("vocab_size"))
        self._seq_len: int | None = None
        self._consumed = 0  # global windows handed out, over all ranks and epochs
        self._orders: dict[tuple[int, int], np.ndarray] = {}

    def windows_per_epoch(self, seq_len: int) -> int:
        """How many windows of seq_len + 1 tokens one pass over the corpus gives."""
        return (self.tokens - 1) // seq_len

    def check_seq_len(self, seq_len: int) -> int:
        """Windows per epoch at `seq_len`; refuses a corpus shorter than one window."""
        n_windows = self.windows_per_epoch(seq_len)
        if n_windows < 1:
            raise AprError(
                f"{self.path}: {self.tokens} tokens is shorter than one window of "
                f"seq_len + 1 = {seq_len + 1} tokens"
            )
        return n_windows

    def next_batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if batch_size < 1 or seq_len < 1:
            raise AprError(f"batch size {batch_size} and seq_len {seq_len} must be positive")
        if self._seq_len is not None and seq_len != self._seq_len:
            raise AprError(
                f"{self.path}: seq_len {seq_len} differs from {self._seq_len} used so far; "
                "reset() the source to change it"
            )
        n_windows = self.check_seq_len(seq_len)
        global_batch = batch_size * self.world_size
        if not self.wrap and self._consumed + global_batch > n_windows:
            raise AprError(
                f"{self.path}: end of data: {n_windows} windows of {seq_len + 1} tokens per "
                f"epoch, {self._consumed} used, a batch needs {global_batch} more (wrap is off)"
            )
        self._seq_len = seq_len
        # Rows are copied as stored and widened to int64 once, straight into each contiguous result.
        out = np.empty((batch_size, seq_len + 1), dtype=np.uint32)  # (B, T+1)
        # Plain Python per row: a handful of int operations cost less than numpy calls on (B,).
        for j, row in enumerate(out):
            k = self._epoch_window(self._consumed + self.rank + j * self.world_size, n_windows)
            start = k * seq_len
            # A window inside one file is the common case, inlined; _read handles the rest.
            f = bisect.bisect_right(self._starts, start) - 1
            lo = start - self._starts[f]
            tokens = self._shards[f].tokens
            if lo + seq_len + 1 <= len(tokens):
                row[:] = tokens[lo : lo + seq_len + 1]
            else:
                self._read(start, row)
        self._consumed += global_batch
        inputs = torch.from_numpy(out[:, :-1].astype(np.int64))  # (B, T)
        labels = torch.from_numpy(out[:, 1:].astype(np.int64))  # (B, T)
        return inputs, labels

    def batch_windows(self, batch_size: int, seq_len: int) -> list[int]:
        """The epoch windows (0 <= k < windows_per_epoch) of this rank's next batch, in row order.

        What `next_batch` will read, without reading it: a teacher cache is keyed by these.
        """
        n_windows = self.check_seq_len(seq_len)
        first = self._consumed + self.rank
        return [
            self._epoch_window(first + j * self.world_size, n_windows) for j in range(batch_size)
        ]

    def windows_needed(self, count: int, seq_len: int) -> tuple[int, int]:
        """(lowest, highest) epoch window among the next `count` global windows, all ranks."""
        n_windows = self.check_seq_len(seq_len)
        first = self._consumed
        if self.shuffle and count < n_windows:
            epochs = range(first // n_windows, (first + count - 1) // n_windows + 1)
            ks = np.concatenate(
                [
                    self._order(e, n_windows)[
                        max(first - e * n_windows, 0) : first + count - e * n_windows
                    ]
                    for e in epochs
                ]
            )
            return int(ks.min()), int(ks.max())
        if count >= n_windows or first % n_windows + count > n_windows:
            return 0, n_windows - 1  # every window (or a wrap past the end)
        return first % n_windows, first % n_windows + count - 1

    def _epoch_window(self, g: int, n_windows: int) -> int:
        """The window global index g reads: g mod the epoch, through the epoch's permutation."""
        epoch, k = divmod(g, n_windows)
        return int(self._order(epoch, n_windows)[k]) if self.shuffle else k

    def window(self, k: int, seq_len: int) -> np.ndarray:
        """Window k of an epoch, tokens [k*seq_len, k*seq_len + seq_len + 1), as uint32.

        Random access for evaluation: the batch position (and so a resume) is not touched.
        """
        n_windows = self.check_seq_len(seq_len)
        if not 0 <= k < n_windows:
            raise AprError(
                f"{self.path}: window {k} is outside 0..{n_windows - 1} at seq_len {seq_len}"
            )
        row = np.empty(seq_len + 1, dtype=np.uint32)
        self._read(k * seq_len, row)
        return row

    def _order(self, epoch: int, n_windows: int) -> np.ndarray:
        # A batch spans at most two epochs, so the previous and current orders are all we keep;
        # keyed by the window count too, since a reset may change seq_len.
        key = (epoch, n_windows)
        if key not in self._orders:
            self._orders = {k: o for k, o in self._orders.items() if k[0] >= epoch - 1}
            self._orders[key] = np.random.default_rng((self.seed, epoch)).permutation(n_windows)
        return self._orders[key]

    def _read(self, start: int, row: np.ndarray) -> None:
        """Copy tokens [start, start + len(row)) of the stream into row, across files if needed."""
        f = bisect.bisect_right(self._starts, start) - 1
        filled = 0
        while filled < len(row):
            tokens = self._shards[f].tokens
            lo = start + filled - self._starts[f]
            take = min(len(row) - filled, len(tokens) - lo)
            row[filled : filled + take] = tokens[lo : lo + take]
            filled += take
            f += 1

    def reset(self) -> None:
        self._consumed = 0
        self._seq_len = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "shards",
            "windows_consumed": self._consumed,
            "seq_len": self._seq_len,
            "tokens": self.tokens,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "shards":
            raise AprError(f"{self.path}: saved data state is {state.get('kind')!r}, not shards")
        if state["tokens"] != self.tokens:
            raise AprError(
                f"{self.path}: dataset has {self.tokens} tokens but the saved position was in a "
                f"dataset of {state['tokens']}"
            )
        saved = (state["shuffle"], state["seed"])
        if saved != (self.shuffle, self.seed):
            raise AprError(
                f"{self.path}: saved position used shuffle={saved[0]} seed={saved[1]}, this "
                f"source has shuffle={self.shuffle} seed={self.seed}"
            )
        self._consumed = int(state["windows_consumed"])
        self._seq_len = state["seq_len"]

    def describe(self) -> dict[str, Any]:
        widths = sorted({s.token_width for s in self.files})
        meta = self.meta or {}
        info: dict[str, Any] = {
            "kind": "shards",
            "path": str(self.path),
            "files": len(self.files),
            "tokens": self.tokens,
            "token_width": widths[0] if len(widths) == 1 else widths,
            "vocab_size": meta.get("vocab_size"),  # the dataset's tokenizer, from meta.json
            "ids_checked_below": self.vocab_size,  # the models' shared vocabulary
            "wrap": self.wrap,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
        }
        if "tokenizer" in meta:
            info["tokenizer"] = meta["tokenizer"]
        if self._seq_len is not None:
            info["seq_len"] = self._seq_len
            info["windows_per_epoch"] = self.windows_per_epoch(self._seq_len)
        return info


def dataset_dirs(path: str | Path) -> list[Path]:
    """The shard folders in `path`: itself if it holds `.bin` files, else its subfolders that do."""
    root = Path(path)
    if root.is_dir() and not any(root.glob("*.bin")):
        subdirs = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*.bin")))
        if subdirs:
            return subdirs
    read_shards(root)  # raises the missing-folder or no-shards error
    return [root]


def inspect_shards(
    path: str | Path, vocab_size: int | None = None, tokenizer: Any = None, sample: int = 64
) -> dict[str, Any]:
    """Files, token count, id range, vocab check and a decoded sample of one shard folder.

    `tokenizer` is anything with `decode(ids) -> str`; `vocab_size` falls back to meta.json's.
    """
    shards = read_shards(path)
    meta = read_meta(path) or {}
    ranges = [r for s in shards if (r := id_range(s.tokens)) is not None]
    report: dict[str, Any] = {
        "path": str(Path(path).resolve()),
        "files": [
            {"name": s.path.name, "format": s.format, "tokens": len(s.tokens)} for s in shards
        ],
        "tokens": sum(len(s.tokens) for s in shards),
        "min_id": min((r[0] for r in ranges), default=None),
        "max_id": max((r[1] for r in ranges), default=None),
        "vocab_size": vocab_size if vocab_size is not None else meta.get("vocab_size"),
        "meta": meta or None,
    }
    if report["vocab_size"] is None:
        report["vocab_check"] = "skipped"
    elif report["max_id"] is None or report["max_id"] < report["vocab_size"]:
        report["vocab_check"] = "ok"
    else:
        report["vocab_check"] = "failed"
        try:
            check_vocab(shards, report["vocab_size"])
        except AprError as e:
            report["vocab_error"] = str(e)
    if tokenizer is not None and sample > 0:
        head: list[int] = []
        for s in shards:
            head += s.tokens[: sample - len(head)].tolist()
        report["sample"] = tokenizer.decode(head)
    return report
