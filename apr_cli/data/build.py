"""The shard builder behind `apr shards build`: text and JSONL documents in, token shards out."""

from __future__ import annotations

import glob
import json
import math
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apr_cli.data.shards import META_FILE, RAW_DTYPE, write_shard
from apr_cli.data.tokenizer import TextTokenizer, load_tokenizer, train_bpe
from apr_cli.errors import AprError
from apr_cli.fsutil import follow_umask

TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
FLUSH_TOKENS = 1 << 20  # tokens buffered per split before a write: 4 MB
# Reported to the progress callback: (bytes of input files just finished, phase).
Progress = Callable[[int, str], None]


@dataclass(frozen=True)
class InputFile:
    """A file to read; `named` when the user gave it directly, so it must be text."""

    path: Path
    named: bool


def collect_inputs(inputs: Sequence[str]) -> list[InputFile]:
    """Expand files, directories (recursively, hidden entries skipped) and globs, in order."""
    found: dict[Path, InputFile] = {}
    for spec in inputs:
        path = Path(spec)
        if path.is_file():
            matches = [InputFile(path, named=True)]
        elif path.is_dir():
            matches = [InputFile(p, False) for p in sorted(path.rglob("*")) if _visible(p, path)]
        elif glob.has_magic(spec):
            paths = sorted(Path(p) for p in glob.glob(spec, recursive=True))
            matches = [InputFile(p, False) for p in paths if p.is_file()]
            if not matches:
                raise AprError(f"input {spec!r}: the pattern matches no files")
        else:
            raise AprError(f"input {spec}: no such file or directory")
        for m in matches:
            found.setdefault(m.path.resolve(), m)
    if not found:
        raise AprError(f"inputs {' '.join(inputs)}: no files found")
    return list(found.values())


def _visible(path: Path, root: Path) -> bool:
    return path.is_file() and not any(part.startswith(".") for part in path.relative_to(root).parts)


def read_documents(file: InputFile, text_field: str) -> Iterator[str] | None:
    """The documents in one file (JSONL: one per line); None for a binary file from a walk."""
    if file.path.suffix == ".jsonl":
        return _jsonl_documents(file.path, text_field)
    data = file.path.read_bytes()
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), len(data), "NUL byte")
        return iter([data.decode("utf-8")])
    except UnicodeDecodeError as e:
        if file.named:
            raise AprError(f"{file.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        return None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise AprError(f"{path}:{line_no}: invalid JSON: {e.msg}") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise AprError(f"{path}:{line_no}: no string field {text_field!r} (--text-field)")
            yield text


def is_val(doc_index: int, val_fraction: float) -> bool:
    """Whether document i goes to validation: floor(n * fraction) of n, spread evenly."""
    return math.floor((doc_index + 1) * val_fraction) > math.floor(doc_index * val_fraction)


class _SplitWriter:
    """Appends token ids to `{split}_{i:06d}.bin` files of at most shard_tokens tokens."""

    def __init__(self, folder: Path, split: str, shard_tokens: int):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.files: list[str] = []
        self.tokens = 0  # written to disk
        self.documents = 0
        self._pending: list[np.ndarray] = []
        self._pending_tokens = 0

    def add(self, ids: np.ndarray) -> None:
        # Buffered, so a corpus of many small documents is not one file open per document.
        self.documents += 1
        self._pending.append(ids)
        self._pending_tokens += len(ids)
        if self._pending_tokens >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> None:
        ids = np.concatenate(self._pending) if self._pending else np.empty(0, RAW_DTYPE)
        self._pending, self._pending_tokens = [], 0
        while len(ids):
            room = self.shard_tokens - self.tokens % self.shard_tokens
            if room == self.shard_tokens:
                self.folder.mkdir(exist_ok=True)
                self.files.append(f"{self.split}_{len(self.files):06d}.bin")
            write_shard(self.folder / self.files[-1], ids[:room], append=True)
            self.tokens += min(room, len(ids))
            ids = ids[room:]


def build_shards(
    inputs: Sequence[str],
    files: Sequence[InputFile],
    out: Path,
    tokenizer: str | None,
    *,
    train_bpe_vocab: int | None = None,
    text_field: str = "text",
    val_fraction: float = 0.05,
    shard_tokens: int = 100_000_000,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Tokenize `files` into `out/train` and `out/val` shards, each with a meta.json; summarise.

    Each document is followed by EOS. Output appears only complete: it is written to a temporary
    folder beside `out` and renamed into place at the end.
    """
    if (tokenizer is None) == (train_bpe_vocab is None):
        raise AprError("give exactly one of --tokenizer and --train-bpe")
    if not 0 <= val_fraction < 1:
        raise AprError(f"--val-fraction {val_fraction}: must be in [0, 1)")
    if shard_tokens < 1:
        raise AprError(f"--shard-tokens {shard_tokens}: must be positive")
    if out.exists() and not out.is_dir():
        raise AprError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise AprError(f"--out {out}: directory is not empty (pass --force to replace it)")
    inside = [f.path for f in files if out.resolve() in f.path.resolve().parents]
    if inside:  # --force would delete the inputs it is reading
        raise AprError(f"--out {out}: holds the input {inside[0]}; choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        summary = _build(
            inputs,
            files,
            tmp,
            tokenizer,
            train_bpe_vocab,
            text_field,
            val_fraction,
            shard_tokens,
            progress,
        )
        follow_umask(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"out": str(out.resolve()), **summary}


def _build(
    inputs: Sequence[str],
    files: Sequence[InputFile],
    folder: Path,
    tokenizer_spec: str | None,
    train_bpe_vocab: int | None,
    text_field: str,
    val_fraction: float,
    shard_tokens: int,
    progress: Progress | None,
) -> dict[str, Any]:
    skipped: set[Path] = set()

    def documents(phase: str) -> Iterator[tuple[int, str]]:
        index = 0
        for file in files:
            docs = read_documents(file, text_field)
            if docs is None:
                skipped.add(file.path)
            for text in docs or ():
                yield index, text
                index += 1
            if progress:
                progress(file.path.stat().st_size, phase)

    if train_bpe_vocab is not None:
        # Trained on the training documents only, so validation text stays unseen.
        train_texts = (t for i, t in documents("training tokenizer") if not is_val(i, val_fraction))
        tok: TextTokenizer = train_bpe(train_texts, train_bpe_vocab, folder / TOKENIZER_FILE)
        source = "byte-level BPE trained on the inputs"
    else:
        tok = load_tokenizer(tokenizer_spec)
        source = tok.name
        if tok.name != "bytes":
            # A copy beside the shards keeps the dataset usable when the original moves.
            shutil.copyfile(tok.name, folder / TOKENIZER_FILE)
    if tok.eos_id is None:
        raise AprError(f"tokenizer {tok.name}: has no end-of-text token to separate documents")

    writers = {split: _SplitWriter(folder / split, split, shard_tokens) for split in SPLITS}
    eos = np.array([tok.eos_id], dtype=RAW_DTYPE)
    for i, text in documents("tokenizing"):
        ids = np.asarray(tok.encode(text), dtype=RAW_DTYPE)
        if len(ids):
            writers["val" if is_val(i, val_fraction) else "train"].add(np.concatenate([ids, eos]))
    for w in writers.values():
        w.flush()
    if writers["train"].tokens == 0:
        raise AprError(f"inputs {' '.join(inputs)}: no text to train on")

    common = {
        "format": "apr-shards",
        "tokenizer": "bytes" if tok.name == "bytes" else f"../{TOKENIZER_FILE}",
        "tokenizer_source": source,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "token_width": RAW_DTYPE.itemsize,
        "sources": list(inputs),
        "source_files": len(files) - len(skipped),
        "skipped_binary_files": len(skipped),
        "text_field": text_field,
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
    }
    splits = {}
    for split, w in writers.items():
        if w.tokens:
            meta = {**common, "split": split, "tokens": w.tokens, "documents": w.documents}
            meta["files"] = w.files
            (folder / split / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
            splits[split] = {"tokens": w.tokens, "documents": w.documents, "files": len(w.files)}
    return {
        "tokenizer": source,
        "vocab_size": tok.vocab_size,
        "splits": splits,
        "skipped_binary_files": len(skipped),
    }


def _replace_dir(new: Path, out: Path) -> None:
    """Move the finished build to `out`, replacing what --force allowed to be replaced."""
    if out.is_dir() and any(out.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(old / out.name)
        new.rename(out)
        shutil.rmtree(old)
    else:
        new.replace(out)
