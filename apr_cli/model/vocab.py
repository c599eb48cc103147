"""Teacher and student vocabularies that differ only by padding rows."""

from __future__ import annotations

from apr_cli.errors import AprError

# Checkpoints pad their embedding to a multiple of 64, 128 or 256 rows (Qwen2.5-Coder-7B has
# 152064 rows, 0.5B has 151936, same tokenizer). A gap this small can only be padding; a larger
# one means different tokenizers, whose logits cannot be compared row by row.
MIN_PADDING_ROWS = 1024
PADDING_FRACTION = 0.01


def shared_vocab_size(teacher_vocab: int, student_vocab: int) -> int:
    """The rows both models share: the smaller vocab, if the gap is at most padding."""
    if teacher_vocab <= 0 or student_vocab <= 0:
        raise AprError(
            f"vocab sizes must be positive (teacher {teacher_vocab}, student {student_vocab})"
        )
    larger = max(teacher_vocab, student_vocab)
    allowed = max(MIN_PADDING_ROWS, int(PADDING_FRACTION * larger))
    gap = abs(teacher_vocab - student_vocab)
    if gap > allowed:
        raise AprError(
            f"teacher vocab {teacher_vocab} and student vocab {student_vocab} cannot be aligned: "
            f"they differ by {gap} rows, more than the {allowed} that padding can explain "
            "(max of 1024 rows and 1% of the larger vocab); use a teacher and student that "
            "share a tokenizer"
        )
    return min(teacher_vocab, student_vocab)
