"""A real headless browser for tests of pages hpcray writes: Debian's chromium.

`render(page, out_dir)` loads a local file with no network, returns the DOM after its
scripts ran and the screenshot's pixels (decoded here: no imaging library needed).
"""

from __future__ import annotations

import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium (apt-get install chromium; .ci/run installs it)")
    return path


def _run(args: list, timeout: float = 90) -> str:
    # --no-sandbox: tests run as root in CI, where chromium's sandbox refuses to start.
    base = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", "--proxy-server=127.0.0.1:9", "--window-size=1200,1600"]
    done = subprocess.run(base + args, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def render(page: Path, out_dir: Path) -> tuple[str, np.ndarray]:
    """(the DOM once the page's scripts ran, the screenshot as an HxWx3 uint8 array)."""
    url = page.resolve().as_uri()
    shot = out_dir / "screenshot.png"
    shot.unlink(missing_ok=True)  # the pixels read below are this run's
    dom = _run(["--dump-dom", f"--screenshot={shot}", url])  # one start of chromium for both
    return dom, read_png(shot)


def read_png(path: Path) -> np.ndarray:
    """An 8-bit RGB or RGBA PNG's pixels as HxWx3 (what chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = int.from_bytes(body[:4], "big"), int.from_bytes(body[4:8], "big")
            depth, color = body[8], body[9]
            assert depth == 8 and color in (2, 6), (depth, color)
            channels = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels
    rows = []
    previous = bytes(stride)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)]
        if kind == 0:
            out = line
        elif kind == 2:
            out = ((np.frombuffer(line, np.uint8).astype(np.uint16)
                    + np.frombuffer(previous, np.uint8)) & 0xFF).astype(np.uint8).tobytes()
        else:  # 1 (sub), 3 (average), 4 (paeth): each byte depends on the one left of it
            out = bytearray(stride)
            for x in range(stride):
                left = out[x - channels] if x >= channels else 0
                up = previous[x]
                if kind == 1:
                    predictor = left
                elif kind == 3:
                    predictor = (left + up) >> 1
                else:
                    upper_left = previous[x - channels] if x >= channels else 0
                    p = left + up - upper_left
                    pa, pb, pc = abs(p - left), abs(p - up), abs(p - upper_left)
                    predictor = left if pa <= pb and pa <= pc else (up if pb <= pc else upper_left)
                out[x] = (line[x] + predictor) & 0xFF
            out = bytes(out)
        rows.append(out)
        previous = out
    pixels = np.frombuffer(b"".join(rows), np.uint8).reshape(height, width, channels)
    return pixels[:, :, :3]
