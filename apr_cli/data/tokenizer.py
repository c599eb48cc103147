"""Text <-> token ids: built-in bytes, a Hugging Face `tokenizer.json`, and BPE training."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from apr_cli.errors import AprError

EOS_TOKEN = "<|endoftext|>"
# Document separators in common tokenizer.json files, most preferred first (Qwen and GPT-2 use
# the first; chat end markers are not document separators and are left out).
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>")


class TextTokenizer(Protocol):
    """What the shard builder, `inspect` and `generate` need from a tokenizer."""

    name: str
    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text; 256 is end-of-text."""

    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        parts, run = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                run.append(i)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            parts.append(EOS_TOKEN if i == self.eos_id else "\ufffd")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, without its automatic special tokens (we place EOS)."""

    def __init__(self, path: Path):
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception for any parse error
            raise AprError(f"{path}: cannot load tokenizer: {str(e).splitlines()[0]}") from None
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = next(
            (i for t in EOS_CANDIDATES if (i := self._tok.token_to_id(t)) is not None), None
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(spec: str | Path, base: Path | None = None) -> TextTokenizer:
    """`bytes` for the built-in byte tokenizer, else a `tokenizer.json` (or a folder holding one).

    A relative path is taken relative to `base` when given (meta.json records one that way).
    """
    if str(spec) == "bytes":
        return ByteTokenizer()
    path = Path(spec) if base is None else base / spec
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise AprError(f"tokenizer {spec}: not found (give 'bytes' or a path to tokenizer.json)")
    return HFTokenizer(path.resolve())


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> TextTokenizer:
    """Train a byte-level BPE tokenizer with an `<|endoftext|>` token, save it and load it back."""
    # 256 byte symbols plus EOS is the smallest vocabulary that can encode any text.
    if vocab_size < 257:
        raise AprError(f"--train-bpe {vocab_size}: the vocabulary needs at least 257 entries")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(out_path))
    return HFTokenizer(Path(out_path).resolve())
