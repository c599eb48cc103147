"""`apr distill` (being written)."""


def distill() -> None:
    """Distill a teacher into a student."""
