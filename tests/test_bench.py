"""`nibble bench` (nibble/bench.py) and its roofline PNG (nibble/plot.py)."""
import json
import struct
import zlib

import numpy as np
import pytest

from nibble import plot
from nibble.cli import main


def _read_png(path) -> np.ndarray:
    """Decode the 8-bit RGB, unfiltered PNGs plot.write_png makes (enough to check what it drew)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    w, h = size
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert not raw[:, 0].any()  # filter type 0 on every row
    return raw[:, 1:].reshape(h, w, 3)


def test_roofline_png_puts_each_point_where_its_values_say(tmp_path):
    series = [("NIBBLE INT4", [(3.9, 9.0), (700.0, 300.0)]), ("CUBLAS FP16", [(1.0, 2.0)])]
    info = plot.roofline_png(tmp_path / "r.png", series, bandwidth_gbps=4000, peak_tflops=750, title="T")
    img = _read_png(tmp_path / "r.png")
    assert img.shape == (plot.H, plot.W, 3)
    assert info["x_decades"] == (0, 4) and info["y_decades"] == (0, 4)  # 750 x 1.5 of headroom -> 10^4
    (_, x_lo, y_lo), (_, x_hi, y_hi) = info["points"][:2]
    assert x_hi > x_lo and y_hi < y_lo  # more intensity: right; more TFLOP/s: up
    for (label, x, y), colour in zip(info["points"], [plot._COLOURS[0]] * 2 + [plot._COLOURS[1]]):
        assert tuple(img[y, x]) == colour, label


@pytest.mark.parametrize("args,msg", [(["--shapes", "4096"], "is not KxN"),
                                      (["--shapes", "100x64"], "multiple of 128"),
                                      (["--ms", "1,x"], "comma-separated"), (["--ms", "0"], ">= 1")])
def test_bad_arguments_are_refused(args, msg, capsys):
    assert main(["bench", *args]) == 1
    assert msg in capsys.readouterr().err


def test_needs_a_gpu(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(["bench", "--ms", "1"]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_on_the_gpu(tmp_path, capsys):
    assert main(["bench", "--shapes", "256x512", "--ms", "1,16,200", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "GB/s" in out and "cuBLAS" in out
    res = json.loads((tmp_path / "bench.json").read_text())
    assert [r["m"] for r in res["rows"]] == [1, 16, 200]
    assert [r["kernel"] for r in res["rows"]] == ["mma8", "mma16", "wgmma256"]
    for r in res["rows"]:
        assert r["rel_err"] < 2e-3 and r["nibble_us"] > 0 and r["cublas_us"] > 0 and r["copy_us"] > 0
    assert _read_png(tmp_path / "roofline.png").shape == (plot.H, plot.W, 3)
    assert (tmp_path / "bench.md").read_text().count("| 256->512 |") == 3
