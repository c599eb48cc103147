"""A loss-curve PNG drawn with numpy alone, so a run needs no plotting library."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

from apr_cli.fsutil import atomic_write_bytes

# 3x5 glyphs for tick labels, one row of three bits per string.
GLYPHS = {
    "0": ["111", "101", "101", "101", "111"],
    "1": ["010", "110", "010", "010", "111"],
    "2": ["111", "001", "111", "100", "111"],
    "3": ["111", "001", "111", "001", "111"],
    "4": ["101", "101", "111", "001", "001"],
    "5": ["111", "100", "111", "001", "111"],
    "6": ["111", "100", "111", "101", "111"],
    "7": ["111", "001", "001", "001", "001"],
    "8": ["111", "101", "111", "101", "111"],
    "9": ["111", "101", "111", "001", "111"],
    ".": ["000", "000", "000", "000", "010"],
    "-": ["000", "000", "111", "000", "000"],
    "e": ["000", "111", "111", "100", "111"],
}
WIDTH, HEIGHT, LEFT, RIGHT, TOP, BOTTOM = 640, 360, 70, 20, 20, 40
INK, GRID, CURVE = (40, 40, 40), (225, 225, 225), (31, 119, 180)


def encode_png(rgb: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 image."""
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + chunk(b"IEND", b"")
    )


def draw_text(img: np.ndarray, x: int, y: int, text: str, scale: int = 2) -> None:
    for i, ch in enumerate(text):
        for r, bits in enumerate(GLYPHS.get(ch, GLYPHS["-"])):
            for c, bit in enumerate(bits):
                if bit == "1":
                    x0, y0 = x + (i * 4 + c) * scale, y + r * scale
                    img[y0 : y0 + scale, x0 : x0 + scale] = INK


def draw_line(img: np.ndarray, x0: float, y0: float, x1: float, y1: float, color) -> None:
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 2
    xs = np.rint(np.linspace(x0, x1, n)).astype(int)
    ys = np.rint(np.linspace(y0, y1, n)).astype(int)
    for dy in (0, 1):  # two pixels thick
        img[np.clip(ys + dy, 0, img.shape[0] - 1), np.clip(xs, 0, img.shape[1] - 1)] = color


def loss_plot_png(losses: list[float]) -> bytes:
    """Loss per step on a log y-axis (losses span decades), with decade and step ticks."""
    img = np.full((HEIGHT, WIDTH, 3), 255, np.uint8)
    values = np.asarray([v for v in losses if math.isfinite(v) and v > 0] or [1.0])
    lo = math.floor(math.log10(values.min()))
    hi = max(math.ceil(math.log10(values.max())), lo + 1)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    steps = max(len(losses), 2)

    def to_x(step: float) -> float:
        return LEFT + (step - 1) / (steps - 1) * plot_w

    def to_y(value: float) -> float:
        return TOP + (hi - math.log10(value)) / (hi - lo) * plot_h

    for decade in range(lo, hi + 1):
        y = to_y(10.0**decade)
        draw_line(img, LEFT, y, LEFT + plot_w, y, GRID)
        draw_text(img, 6, int(y) - 5, f"1e{decade}")
    for k in range(5):
        step = 1 + round(k * (steps - 1) / 4)
        x = to_x(step)
        draw_line(img, x, TOP + plot_h, x, TOP + plot_h + 6, INK)
        draw_text(img, int(x) - 6, TOP + plot_h + 12, str(step))
    draw_line(img, LEFT, TOP, LEFT, TOP + plot_h, INK)
    draw_line(img, LEFT, TOP + plot_h, LEFT + plot_w, TOP + plot_h, INK)
    points = [(to_x(i + 1), to_y(v)) for i, v in enumerate(losses) if math.isfinite(v) and v > 0]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        draw_line(img, x0, y0, x1, y1, CURVE)
    return encode_png(img)


def write_loss_plot(path: Path, losses: list[float]) -> None:
    atomic_write_bytes(path, loss_plot_png(losses))
