"""Image dimensions from the first bytes of a file, before anything is decoded.

A 1 MB PNG can decode to a 30000x30000 image (2.7 GB as BGR), so the pixel count is checked against a
limit first. Covers the formats OpenCV decodes for this project's inputs: PNG, JPEG, BMP, GIF, WebP, TIFF
and the PNM family. Returns None for anything else (the caller then relies on OpenCV's own limit).
"""
from __future__ import annotations

import struct
from typing import Optional, Tuple

Size = Tuple[int, int]  # (width, height)


def image_size(data: bytes) -> Optional[Size]:
    for sniff, parse in _PARSERS:
        if sniff(data):
            try:
                return parse(data)
            except (struct.error, IndexError, ValueError):
                return None
    return None


def _png(d: bytes) -> Size:
    w, h = struct.unpack(">II", d[16:24])
    return w, h


def _gif(d: bytes) -> Size:
    w, h = struct.unpack("<HH", d[6:10])
    return w, h


def _bmp(d: bytes) -> Size:
    if struct.unpack("<I", d[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        w, h = struct.unpack("<HH", d[18:22])
        return w, h
    w, h = struct.unpack("<ii", d[18:26])
    return abs(w), abs(h)  # negative height: top-down rows


def _jpeg(d: bytes) -> Size:
    i = 2
    while i + 9 < len(d):
        if d[i] != 0xFF:
            raise ValueError("not at a marker")
        marker = d[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack(">H", d[i + 2 : i + 4])[0]
        # Start-of-frame markers C0..CF, except DHT (C4), JPG (C8) and DAC (CC), carry the size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", d[i + 5 : i + 9])
            return w, h
        i += 2 + length
    raise ValueError("no frame header in the bytes read")


def _webp(d: bytes) -> Size:
    chunk = d[12:16]
    if chunk == b"VP8X":
        w = 1 + int.from_bytes(d[24:27], "little")
        h = 1 + int.from_bytes(d[27:30], "little")
        return w, h
    if chunk == b"VP8L":
        b = int.from_bytes(d[21:25], "little")
        return 1 + (b & 0x3FFF), 1 + ((b >> 14) & 0x3FFF)
    if chunk == b"VP8 ":
        w, h = struct.unpack("<HH", d[26:30])
        return w & 0x3FFF, h & 0x3FFF
    raise ValueError("unknown WebP chunk")


def _tiff(d: bytes) -> Size:
    end = "<" if d[:2] == b"II" else ">"
    (ifd,) = struct.unpack(end + "I", d[4:8])
    (n,) = struct.unpack(end + "H", d[ifd : ifd + 2])
    dims = {}
    for k in range(n):
        e = d[ifd + 2 + 12 * k : ifd + 14 + 12 * k]
        tag, typ = struct.unpack(end + "HH", e[:4])
        if tag in (256, 257):  # ImageWidth, ImageLength: SHORT (3) or LONG (4)
            dims[tag] = struct.unpack(end + ("H" if typ == 3 else "I"), e[8:10] if typ == 3 else e[8:12])[0]
    return dims[256], dims[257]


def _pnm(d: bytes) -> Size:
    fields = []
    for line in d[2:].split(b"\n"):
        fields += line.split(b"#", 1)[0].split()
        if len(fields) >= 2:
            return int(fields[0]), int(fields[1])
    raise ValueError("no size in the PNM header")


_PARSERS = (
    (lambda d: d[:8] == b"\x89PNG\r\n\x1a\n", _png),
    (lambda d: d[:2] == b"\xff\xd8", _jpeg),
    (lambda d: d[:6] in (b"GIF87a", b"GIF89a"), _gif),
    (lambda d: d[:2] == b"BM", _bmp),
    (lambda d: d[:4] == b"RIFF" and d[8:12] == b"WEBP", _webp),
    (lambda d: d[:4] in (b"II*\x00", b"MM\x00*"), _tiff),
    (lambda d: len(d) > 2 and d[:1] == b"P" and d[1:2] in b"123456" and d[2:3].isspace(), _pnm),
)
