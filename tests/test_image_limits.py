"""Hostile image files: a decompression bomb is refused from its header, odd files get one clear line, and
memory stays bounded (issue 15: a 855 KB PNG once took 4.5 GB)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge_quq.bundle import load_bundle
from edge_quq.errors import InputError
from edge_quq.imageheader import image_size
from edge_quq.preprocess import min_decode_size, preprocess_image, read_image

SAMPLES = Path(__file__).resolve().parents[1] / "edge_quq" / "data" / "samples"


def write_black_png(path: Path, width: int, height: int) -> None:
    """A valid gray PNG of any size, written row by row so the test itself needs no big buffer."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    comp = zlib.compressobj(9)
    row = b"\x00" * (width + 1)  # filter byte + pixels
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


CASES = [(ext, shape) for ext in (".png", ".jpg", ".bmp", ".webp", ".tiff", ".pgm", ".ppm")
         for shape in ((37, 53, 3), (480, 640, 3), (21, 19))
         if not (ext == ".pgm" and len(shape) == 3 or ext == ".ppm" and len(shape) == 2)]  # pgm: gray only; ppm: color


@pytest.mark.parametrize("ext,shape", CASES)
def test_header_size_matches_decoded_size(tmp_path, ext, shape):
    img = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    f = tmp_path / f"x{ext}"
    assert cv2.imwrite(str(f), img)
    assert image_size(f.read_bytes()) == (shape[1], shape[0])


def test_header_size_of_gif_from_pillow(tmp_path):
    from PIL import Image

    f = tmp_path / "x.gif"
    Image.new("L", (321, 123)).save(f)
    assert image_size(f.read_bytes()) == (321, 123)


def test_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    write_black_png(bomb, 10000, 10000)  # 100 MP, 0.1 MB on disk
    assert bomb.stat().st_size < 300_000
    with pytest.raises(InputError, match=r"bomb.png: 10000x10000 image has 100.0 MP, more than the limit of 50 MP \(--max-pixels\)"):
        read_image(bomb)
    assert read_image(bomb, max_pixels=200_000_000).shape == (10000, 10000)


def test_odd_files_get_one_clear_reason(tmp_path):
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"x.png: not a regular file \(a FIFO\)"):
        read_image(fifo)  # would block forever if it were opened for a blocking read
    loop = tmp_path / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match="symbolic link loop"):
        read_image(loop)
    with pytest.raises(InputError, match="not a readable image"):
        read_image("/proc/self/status")  # size 0 in stat, content when read: not "empty file"
    with pytest.raises(InputError, match="not a regular file"):
        read_image("/dev/zero")


def test_large_jpeg_decodes_reduced_and_gives_the_same_input():
    spec = load_bundle().input.preprocess
    img = cv2.resize(cv2.imread(str(SAMPLES / "01_trouser.png")), (2240, 2240), interpolation=cv2.INTER_CUBIC)
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"eq-big-{os.getpid()}.jpg"
    path.write_bytes(enc.tobytes())
    try:
        reduced = read_image(path, min_size=min_decode_size(spec))
        full = read_image(path)
    finally:
        path.unlink()
    assert reduced.shape[0] == 2240 // 8 and full.shape[0] == 2240
    a, b = preprocess_image(reduced, spec), preprocess_image(full, spec)
    assert np.abs(a - b).max() < 0.05 * (np.abs(b).max() + 1e-6) + 0.05


def test_huge_array_is_shrunk_in_its_own_dtype_and_small_ones_are_exact():
    spec = load_bundle().input.preprocess
    small = cv2.imread(str(SAMPLES / "05_sandal.png"), cv2.IMREAD_UNCHANGED)
    from edge_quq.preprocess import to_pixels

    ref = to_pixels(small, spec.color)  # 28x28 model input: no resize at all
    assert np.array_equal(preprocess_image(small, spec), (ref * np.float32(spec.pixel_scale) - np.float32(spec.mean[0])) / np.float32(spec.std[0]))
    big = cv2.resize(small, (2800, 2800), interpolation=cv2.INTER_NEAREST)
    assert np.abs(preprocess_image(big, spec) - preprocess_image(small, spec)).max() < 0.02


def test_predict_refuses_the_bomb_and_still_answers_the_good_file(tmp_path):
    bomb = tmp_path / "bomb.png"
    write_black_png(bomb, 30000, 30000)  # the file: 900 MP in under 1 MB
    r = subprocess.run([sys.executable, "-m", "edge_quq", "predict", "--json", "--seed", "0", str(bomb), str(SAMPLES / "00_t-shirt-top.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert errors == [f"error: {bomb}: 30000x30000 image has 900.0 MP, more than the limit of 50 MP (--max-pixels)"]
    results = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert [x.get("label") for x in results if "error" not in x] == ["T-shirt/top"]
    summary = json.loads(r.stderr.strip().splitlines()[-1])["summary"]
    assert summary["peak_rss_mb"] < 400  # a memory bound, not a timing: the decode never happens
