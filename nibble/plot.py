"""A roofline chart as a PNG, with numpy and zlib only (the GPU machines have no matplotlib).

    roofline_png(path, points, bandwidth_gbps, peak_tflops, title)

x: arithmetic intensity (FLOP per byte moved), y: TFLOP/s, both log10; the memory ceiling
(bandwidth x intensity) and the compute ceiling (peak) as grey lines; `points` are
(label, [(intensity, tflops), ...]) series, one colour and marker each, named in a legend. Text is
drawn with the 5x7 bitmap font below (upper case, digits and a little punctuation).
"""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np

_FONT = {  # 5x7 glyphs, one string per row, '#' = ink
    "0": [" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "],
    "1": ["  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
    "2": [" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"],
    "3": ["#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "],
    "4": ["   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "],
    "5": ["#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "],
    "6": ["  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "],
    "7": ["#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "],
    "8": [" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "],
    "9": [" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "],
    ".": ["     ", "     ", "     ", "     ", "     ", " ##  ", " ##  "],
    "-": ["     ", "     ", "     ", "#####", "     ", "     ", "     "],
    "/": ["    #", "    #", "   # ", "  #  ", " #   ", "#    ", "#    "],
    "(": ["   # ", "  #  ", " #   ", " #   ", " #   ", "  #  ", "   # "],
    ")": [" #   ", "  #  ", "   # ", "   # ", "   # ", "  #  ", " #   "],
    ",": ["     ", "     ", "     ", "     ", " ##  ", "  #  ", " #   "],
    "=": ["     ", "     ", "#####", "     ", "#####", "     ", "     "],
    " ": ["     "] * 7,
    "A": [" ### ", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"],
    "B": ["#### ", "#   #", "#   #", "#### ", "#   #", "#   #", "#### "],
    "C": [" ### ", "#   #", "#    ", "#    ", "#    ", "#   #", " ### "],
    "D": ["#### ", "#   #", "#   #", "#   #", "#   #", "#   #", "#### "],
    "E": ["#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#####"],
    "F": ["#####", "#    ", "#    ", "#### ", "#    ", "#    ", "#    "],
    "G": [" ### ", "#   #", "#    ", "# ###", "#   #", "#   #", " ####"],
    "H": ["#   #", "#   #", "#   #", "#####", "#   #", "#   #", "#   #"],
    "I": [" ### ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "],
    "K": ["#   #", "#  # ", "# #  ", "##   ", "# #  ", "#  # ", "#   #"],
    "L": ["#    ", "#    ", "#    ", "#    ", "#    ", "#    ", "#####"],
    "M": ["#   #", "## ##", "# # #", "# # #", "#   #", "#   #", "#   #"],
    "N": ["#   #", "#   #", "##  #", "# # #", "#  ##", "#   #", "#   #"],
    "O": [" ### ", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "],
    "P": ["#### ", "#   #", "#   #", "#### ", "#    ", "#    ", "#    "],
    "R": ["#### ", "#   #", "#   #", "#### ", "# #  ", "#  # ", "#   #"],
    "S": [" ####", "#    ", "#    ", " ### ", "    #", "    #", "#### "],
    "T": ["#####", "  #  ", "  #  ", "  #  ", "  #  ", "  #  ", "  #  "],
    "U": ["#   #", "#   #", "#   #", "#   #", "#   #", "#   #", " ### "],
    "V": ["#   #", "#   #", "#   #", "#   #", "#   #", " # # ", "  #  "],
    "W": ["#   #", "#   #", "#   #", "# # #", "# # #", "# # #", " # # "],
    "X": ["#   #", "#   #", " # # ", "  #  ", " # # ", "#   #", "#   #"],
    "Y": ["#   #", "#   #", " # # ", "  #  ", "  #  ", "  #  ", "  #  "],
    "Z": ["#####", "    #", "   # ", "  #  ", " #   ", "#    ", "#####"],
}
_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
W, H = 960, 600
LEFT, RIGHT, TOP, BOTTOM = 90, 250, 50, 70  # plot margins, pixels (legend in the right one)


def text(img: np.ndarray, x: int, y: int, s: str, colour=(0, 0, 0), scale: int = 2) -> None:
    """Draw s (upper-cased; unknown characters as blanks) with its top-left corner at (x, y)."""
    for ch in s.upper():
        rows = _FONT.get(ch, _FONT[" "])
        for r, row in enumerate(rows):
            for c, px in enumerate(row):
                if px == "#":
                    img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = colour
        x += 6 * scale


def _line(img, x0, y0, x1, y1, colour, width=2):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    for t in np.linspace(0.0, 1.0, n):
        x, y = int(round(x0 + (x1 - x0) * t)), int(round(y0 + (y1 - y0) * t))
        img[max(0, y - width // 2):y + (width + 1) // 2, max(0, x - width // 2):x + (width + 1) // 2] = colour


def _marker(img, x, y, colour, kind: int, r: int = 5):
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            inside = (max(abs(dx), abs(dy)) <= r if kind == 0 else dx * dx + dy * dy <= r * r if kind == 1
                      else abs(dx) + abs(dy) <= r)
            if inside and 0 <= y + dy < img.shape[0] and 0 <= x + dx < img.shape[1]:
                img[y + dy, x + dx] = colour


def write_png(path, img: np.ndarray) -> None:
    """An RGB uint8 array [h, w, 3] as a PNG file (8-bit truecolour, no filtering)."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[i].astype(np.uint8).tobytes() for i in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)


def roofline_png(path, series: list, bandwidth_gbps: float, peak_tflops: float, title: str = "") -> dict:
    """Draw the chart; returns the axis ranges (log10) and each point's pixel, for checks."""
    pts = [p for _, ps in series for p in ps if p[0] > 0 and p[1] > 0]
    ridge = peak_tflops * 1e12 / (bandwidth_gbps * 1e9)  # FLOP/byte where the ceilings meet
    xs = [p[0] for p in pts] + [ridge]
    ys = [p[1] for p in pts] + [peak_tflops]
    x0, x1 = math.floor(math.log10(min(xs))), math.ceil(math.log10(max(xs) * 2))
    y0, y1 = math.floor(math.log10(min(ys))), math.ceil(math.log10(max(ys) * 1.5))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    px = lambda v: int(LEFT + (math.log10(v) - x0) / (x1 - x0) * pw)
    py = lambda v: int(TOP + ph - (math.log10(v) - y0) / (y1 - y0) * ph)
    img = np.full((H, W, 3), 255, np.uint8)
    for e in range(x0, x1 + 1):  # grid and decade labels
        _line(img, px(10.0 ** e), TOP, px(10.0 ** e), TOP + ph, (225, 225, 225), 1)
        text(img, px(10.0 ** e) - 12, TOP + ph + 8, f"{10.0 ** e:g}", scale=2)
    for e in range(y0, y1 + 1):
        _line(img, LEFT, py(10.0 ** e), LEFT + pw, py(10.0 ** e), (225, 225, 225), 1)
        label = f"{10.0 ** e:g}"
        text(img, LEFT - 12 * len(label) - 8, py(10.0 ** e) - 7, label, scale=2)
    _line(img, LEFT, TOP, LEFT, TOP + ph, (0, 0, 0), 2)
    _line(img, LEFT, TOP + ph, LEFT + pw, TOP + ph, (0, 0, 0), 2)
    # ceilings: bandwidth x intensity up to the ridge, then the peak
    lo = 10.0 ** x0
    start = max(lo, 10.0 ** y0 * 1e12 / (bandwidth_gbps * 1e9))
    _line(img, px(start), py(start * bandwidth_gbps * 1e9 / 1e12), px(ridge), py(peak_tflops), (90, 90, 90), 3)
    _line(img, px(ridge), py(peak_tflops), px(10.0 ** x1), py(peak_tflops), (90, 90, 90), 3)
    text(img, px(ridge) + 8, py(peak_tflops) - 20, f"FP16 PEAK {peak_tflops:.0f}", (90, 90, 90), 2)
    mid = math.sqrt(start * ridge)  # the label halfway along the bandwidth line, above it
    text(img, px(mid) - 150, py(mid * bandwidth_gbps * 1e-3) - 40, f"COPY {bandwidth_gbps:.0f} GB/S",
         (90, 90, 90), 2)
    pixels = []
    for i, (label, ps) in enumerate(series):
        colour = _COLOURS[i % len(_COLOURS)]
        for v, t in ps:
            if v > 0 and t > 0:
                pixels.append((label, px(v), py(t)))
                _marker(img, px(v), py(t), colour, i % 3)
        _marker(img, W - RIGHT + 24, TOP + 20 + 28 * i, colour, i % 3, 6)
        text(img, W - RIGHT + 40, TOP + 13 + 28 * i, label, colour, 2)
    text(img, LEFT, 12, title, scale=2)
    text(img, LEFT + pw // 2 - 120, H - 32, "FLOP PER BYTE (LOG)", scale=2)
    text(img, LEFT + 10, TOP + 8, "TFLOP/S (LOG)", scale=2)
    write_png(path, img)
    return {"x_decades": (x0, x1), "y_decades": (y0, y1), "points": pixels}
