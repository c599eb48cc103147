"""`apr teacher-cache build`: run the teacher once over a dataset's windows and store its outputs.

Shards are built in order, each complete before it is recorded, so a killed build run again with
the same command redoes at most the shards it was writing and ends byte for byte equal to an
uninterrupted one. Under torchrun rank r builds shards r, r + W, r + 2W, ...
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes

from apr_cli.data.shards import ShardBatchSource
from apr_cli.distill.backend import Backend, select_backend
from apr_cli.distill.losses import auto_chunk_tokens
from apr_cli.errors import AprError
from apr_cli.fsutil import atomic_write, atomic_write_bytes, atomic_write_json
from apr_cli.model.checkpoint import CONFIG, load_model, weight_files
from apr_cli.model.qwen2 import Qwen2ForCausalLM
from apr_cli.teacher_cache.format import (
    CACHE_DTYPES,
    HEADER,
    KINDS,
    LOGP_FLOOR,
    SHARDS,
    TEACHER_WEIGHT,
    Header,
    Layout,
    dataset_fingerprint,
    file_sha256,
    shard_paths,
)
from apr_cli.teacher_cache.reader import TeacherCache, shard_problem

# Shards of about this size: small enough to redo after a kill, large enough to stay few.
TARGET_SHARD_BYTES = 64 * 2**20
# A test's fault hook: SIGKILL this process once shard N's records are in place but before its
# index entry is (the one moment a plain kill is unlikely to hit).
CRASH_AFTER_RECORDS = "APR_TEACHER_CACHE_CRASH_AFTER_RECORDS"


@dataclass
class BuildOptions:
    """What `apr teacher-cache build` was asked for."""

    teacher: str
    dataset: Path
    seq_len: int
    out: Path
    kind: str = "hidden"
    top_k: int = 32
    temperature: float = 3.0  # topk: must equal the distill run's --temperature
    cache_dtype: str = "bf16"  # hidden: storage of the hidden states
    windows: str | None = None  # "A:B", epoch windows [A, B); default every window
    batch_size: int = 8  # windows per teacher forward
    shard_windows: int = 0  # windows per shard file; 0: about TARGET_SHARD_BYTES
    device: str = "auto"

    def validate(self) -> None:
        checks = [
            (self.kind in KINDS, f"--kind must be one of {', '.join(KINDS)}, got {self.kind!r}"),
            (self.seq_len > 0, f"--seq-len must be > 0, got {self.seq_len}"),
            (self.top_k > 0, f"--top-k must be > 0, got {self.top_k}"),
            (self.temperature > 0, f"--temperature must be > 0, got {self.temperature}"),
            (
                self.cache_dtype in CACHE_DTYPES,
                f"--cache-dtype must be one of {', '.join(CACHE_DTYPES)}, got {self.cache_dtype!r}",
            ),
            (self.batch_size > 0, f"--batch-size must be > 0, got {self.batch_size}"),
            (self.shard_windows >= 0, f"--shard-windows must be >= 0, got {self.shard_windows}"),
        ]
        for ok, message in checks:
            if not ok:
                raise AprError(message)


def parse_windows(value: str | None, n_windows: int) -> tuple[int, int]:
    """'A:B' (either side may be empty) -> [A, B) within the dataset's n_windows."""
    if value is None:
        return 0, n_windows
    first, sep, end = value.partition(":")
    try:
        lo = int(first) if first else 0
        hi = int(end) if end else n_windows
    except ValueError:
        lo = hi = -1
    if not sep or not 0 <= lo < hi <= n_windows:
        raise AprError(
            f"--windows {value!r}: expected A:B with 0 <= A < B <= {n_windows} "
            "(the dataset's windows at this --seq-len)"
        )
    return lo, hi


def teacher_fingerprint(model: Qwen2ForCausalLM, info: dict[str, Any]) -> dict[str, Any]:
    """Hashes of the checkpoint files (a folder), or of the weights themselves (a preset)."""
    if info["path"] is not None:
        folder = Path(info["path"])
        files = [folder / CONFIG, *weight_files(folder)]
        return {"files": {f.name: file_sha256(f) for f in files}}
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return {"weights_sha256": digest.hexdigest()}


def teacher_records(
    model: Qwen2ForCausalLM, inputs: torch.Tensor, layout: Layout, out: np.ndarray
) -> None:
    """Write the teacher's records for inputs (b, T) into out (b, T) of the record dtype."""
    hidden = model.hidden_states(inputs)  # (b, T, C)
    if layout.kind == "hidden":
        if layout.cache_dtype == "bf16":
            out[:] = hidden.to(torch.bfloat16).view(torch.int16).cpu().numpy().view("<u2")
        else:
            out[:] = hidden.float().cpu().numpy()
        return
    flat, rows = hidden.reshape(-1, hidden.shape[-1]), out.reshape(-1)  # (N, C), (N,)
    weight = model.output_weight
    # Logits a block of tokens at a time, as the chunked loss does: never (N, V) at once.
    chunk = auto_chunk_tokens(weight.shape[0])
    for start in range(0, flat.shape[0], chunk):
        logits = F.linear(flat[start : start + chunk], weight).float()  # (n, V)
        logp = F.log_softmax(logits / layout.temperature, dim=-1)
        top, ids = logp.topk(layout.top_k, dim=-1)  # (n, K), largest first
        tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)  # (n,) log of the rest
        block = rows[start : start + chunk]
        block["logp"] = top.clamp(min=LOGP_FLOOR).half().cpu().numpy()
        block["tail"] = tail.clamp(min=LOGP_FLOOR).half().cpu().numpy()
        block["ids"] = ids.cpu().numpy()


def build_cache(
    options: BuildOptions, on_shard: Callable[[int, int, int, bool], None] | None = None
) -> dict[str, Any]:
    """Build (or continue building) the cache; returns what `inspect` reports.

    `on_shard(done, total, shard, skipped)` follows this rank's progress.
    """
    options.validate()
    backend = select_backend(options.device)
    teacher, info = load_model(options.teacher, dtype=backend.teacher_dtype, device=backend.device)
    teacher.eval().requires_grad_(False)
    cfg = teacher.config
    if options.seq_len > cfg.max_position_embeddings:
        raise AprError(
            f"--seq-len {options.seq_len} exceeds the teacher's context of "
            f"{cfg.max_position_embeddings}"
        )
    if options.kind == "topk" and options.top_k >= cfg.vocab_size:
        raise AprError(
            f"--top-k {options.top_k} must be below the teacher's vocab of {cfg.vocab_size} "
            "(use --kind hidden to keep every logit)"
        )
    source = ShardBatchSource(options.dataset, vocab_size=cfg.vocab_size)
    n_windows = source.check_seq_len(options.seq_len)
    windows = parse_windows(options.windows, n_windows)
    layout = Layout(
        kind=options.kind,
        seq_len=options.seq_len,
        **(
            {"hidden_size": cfg.hidden_size, "cache_dtype": options.cache_dtype}
            if options.kind == "hidden"
            else {
                "top_k": options.top_k,
                "temperature": options.temperature,
                "id_dtype": "uint16" if cfg.vocab_size <= 2**16 else "uint32",
            }
        ),
    )
    out = Path(options.out)
    weight = None  # the exact kind's output weight, as the bytes of teacher.safetensors
    if options.kind == "hidden":
        weight = safetensors_bytes({"output_weight": teacher.output_weight.detach().cpu()})
    if out.exists() and not (out / HEADER).is_file() and any(out.iterdir()):
        raise AprError(f"--out {out}: exists, is not empty and holds no teacher cache")
    header = Header(
        layout=layout,
        windows=windows,
        windows_per_shard=options.shard_windows
        or max(1, TARGET_SHARD_BYTES // layout.bytes_per_window),
        batch_size=options.batch_size,
        compute_dtype=backend.compute_dtype,
        teacher={
            "spec": options.teacher,
            "kind": info["kind"],
            "config": cfg.to_dict(),
            "vocab_size": cfg.vocab_size,
            "parameters": info["parameters"],
            "fingerprint": teacher_fingerprint(teacher, info),
        },
        dataset={
            "path": str(source.path),
            "tokens": source.tokens,
            "windows_per_epoch": n_windows,
            "fingerprint": dataset_fingerprint(source.path),
        },
        teacher_weight_sha256=None if weight is None else hashlib.sha256(weight).hexdigest(),
    )
    if backend.is_main:
        _write_or_check_header(out, header)  # refuses a different build before writing
        (out / SHARDS).mkdir(exist_ok=True)
        if weight is not None:
            atomic_write_bytes(out / TEACHER_WEIGHT, weight)
        for stale in (out / SHARDS).glob(".*.tmp"):  # an interrupted write, never trusted
            stale.unlink()
    _barrier(backend)
    mine = range(backend.rank, header.shards, backend.world_size)
    for done, i in enumerate(mine, start=1):
        skipped = shard_problem(out, header, i) is None
        if not skipped:
            _build_shard(teacher, source, header, out, i, backend)
        if on_shard is not None:
            on_shard(done, len(mine), i, skipped)
    _barrier(backend)
    return TeacherCache(out, verify=False).describe()


def _barrier(backend: Backend) -> None:
    if backend.world_size > 1:
        dist.barrier()


def _write_or_check_header(out: Path, header: Header) -> None:
    """A new cache gets its header; an existing one must have been asked for the same way."""
    path = out / HEADER
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise AprError(f"{path}: unreadable ({e}); choose another --out") from None
        new = json.loads(json.dumps(header.to_dict()))  # as stored: tuples become lists
        keys = sorted(k for k in {*old, *new} if old.get(k) != new.get(k) and k != "checksum")
        if keys:
            raise AprError(
                f"--out {out}: holds a cache built differently ({', '.join(keys)} differ); "
                "continue it with the same command, or choose another --out"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, header.to_dict())


def _build_shard(
    teacher: Qwen2ForCausalLM,
    source: ShardBatchSource,
    header: Header,
    out: Path,
    i: int,
    backend: Backend,
) -> None:
    first, end = header.shard_windows(i)
    layout = header.layout
    records = np.empty((end - first, layout.seq_len), dtype=layout.record_dtype())  # (S, T)
    for lo in range(first, end, header.batch_size):
        ks = range(lo, min(lo + header.batch_size, end))
        rows = np.stack([source.window(k, layout.seq_len)[:-1] for k in ks])  # (b, T)
        inputs = torch.from_numpy(rows.astype(np.int64)).to(backend.device)
        with torch.inference_mode(), backend.autocast():
            teacher_records(teacher, inputs, layout, records[lo - first : lo - first + len(ks)])
    bin_path, entry_path = shard_paths(out, i)
    atomic_write(bin_path, lambda f: f.write(records.data))
    if os.environ.get(CRASH_AFTER_RECORDS) == str(i):
        os.kill(os.getpid(), signal.SIGKILL)
    entry = {
        "shard": i,
        "windows": [first, end],
        "bytes": records.nbytes,
        "sha256": hashlib.sha256(records.data).hexdigest(),
    }
    atomic_write_json(entry_path, entry)
