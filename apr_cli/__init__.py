"""apr: distill a teacher language model into a smaller student."""

__version__ = "0.1.0"
