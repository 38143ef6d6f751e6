"""Crafted uploads: files under the size limit made to keep an image parser busy, and how long each takes.

    python -m demo.crafted [--repeats 3] [--out FOLDER]

Each maker returns the bytes of one hostile file of a kind a reliability run sent to the demo (many
blocks, chunks, segments, pages, frames or tags; slow encodings). `load_image` must refuse or decode
every one of them quickly; this script prints, per file, its size, the median seconds `load_image`
took over `--repeats` runs and what it answered. The demo's tests use the same makers
(tests/test_demo.py). Take the timings with nothing else running on the machine.
"""

from __future__ import annotations

import argparse
import io
import statistics
import struct
import sys
import time
import zlib
from pathlib import Path

from PIL import Image

from demo.containers import MAX_FRAMES

_GIF_HEAD = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
_GIF_FRAME = b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"  # one 1x1 frame


def gif_frames(frames: int) -> bytes:
    """A valid GIF of `frames` one-pixel frames (15 bytes each)."""
    return _GIF_HEAD + _GIF_FRAME * frames + b"\x3b"


def gif_comment_blocks(blocks: int = 60_000) -> bytes:
    """One comment extension of `blocks` sub-blocks of 255 bytes before a 1x1 frame (15 MB for 60,000)."""
    return _GIF_HEAD + b"\x21\xfe" + (b"\xff" + b"c" * 255) * blocks + b"\x00" + _GIF_FRAME + b"\x3b"


def gif_comment_extensions(extensions: int = 60_000) -> bytes:
    """`extensions` comment extensions of one 255-byte sub-block each before a 1x1 frame."""
    return _GIF_HEAD + (b"\x21\xfe\xff" + b"c" * 255 + b"\x00") * extensions + _GIF_FRAME + b"\x3b"


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _small(fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunks(chunks: int = 100_000) -> bytes:
    """An 8x8 PNG with `chunks` private ancillary chunks between its header and its pixels."""
    png = _small("PNG")
    return png[:33] + _png_chunk(b"prVt", b"x" * 8) * chunks + png[33:]


def tiff_pages(pages: int = 1_200) -> bytes:
    """A TIFF of `pages` 4x4 pages (written by Pillow)."""
    frames = [Image.new("RGB", (4, 4), (i % 256, 0, 0)) for i in range(pages)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "TIFF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def tiff_tags(pages: int = 1_000, tags: int = 1_000) -> bytes:
    """A little-endian TIFF of `pages` 2x2 grey pages, each with `tags` extra entries of private tag 65000."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for page in range(pages):
        entries = 9 + tags
        pixels_at = len(out) + 2 + 12 * entries + 4
        out += struct.pack("<H", entries)
        for tag, kind, value in ((256, 3, 2), (257, 3, 2), (258, 3, 8), (259, 3, 1), (262, 3, 1)):
            out += struct.pack("<HHIHH", tag, kind, 1, value, 0)
        out += struct.pack("<HHII", 273, 4, 1, pixels_at)
        for tag, kind, value in ((277, 3, 1), (278, 3, 2)):
            out += struct.pack("<HHIHH", tag, kind, 1, value, 0)
        out += struct.pack("<HHII", 279, 4, 1, 4)
        out += struct.pack("<HHIHH", 65000, 3, 1, 0, 0) * tags
        out += struct.pack("<I", pixels_at + 4 if page < pages - 1 else 0) + b"\x00" * 4
    return bytes(out)


def webp_frames(frames: int = 1_200) -> bytes:
    """An animated WebP of `frames` 4x4 frames (written by Pillow)."""
    images = [Image.new("RGB", (4, 4), (i % 256, 0, 0)) for i in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, "WEBP", save_all=True, append_images=images[1:], duration=10, lossless=True)
    return buffer.getvalue()


def jpeg_markers(markers: int = 1_000_000) -> bytes:
    """An 8x8 JPEG with `markers` one-byte comment segments before its image data."""
    jpeg = _small("JPEG")
    return jpeg[:2] + b"\xff\xfe\x00\x03c" * markers + jpeg[2:]


def jpeg_stray_bytes(count: int = 20_000_000) -> bytes:
    """An 8x8 JPEG with `count` zero bytes between its first segment and the next."""
    jpeg = _small("JPEG")
    first_end = 4 + struct.unpack(">H", jpeg[4:6])[0]
    return jpeg[:first_end] + b"\x00" * count + jpeg[first_end:]


def jpeg_scans(scans: int = 10_000) -> bytes:
    """A progressive 8x8 JPEG whose last scan is repeated until it has `scans` scans."""
    jpeg = _small("JPEG", progressive=True)
    last = jpeg.rindex(b"\xff\xda")
    return jpeg[:last] + jpeg[last:-2] * (scans - jpeg.count(b"\xff\xda") + 1) + b"\xff\xd9"


def ppm_long_comment(size: int = 20_000_000) -> bytes:
    """An 8x8 binary PPM whose header holds a comment of `size` bytes."""
    return b"P6\n#" + b"c" * size + b"\n8 8\n255\n" + b"\x00" * 192


def ppm_plain(side: int = 1_500) -> bytes:
    """A plain (ASCII) PPM of side x side pixels."""
    return f"P3\n{side} {side}\n255\n".encode() + b"1 2 3\n" * side * side


def ppm_sixteen_bit(side: int = 1_500) -> bytes:
    """A binary PPM of side x side pixels with maximum value 1000 (Pillow decodes it in Python)."""
    return f"P6\n{side} {side}\n1000\n".encode() + b"\x01\x02" * 3 * side * side


def bmp_rle_runs(side: int = 3_000) -> bytes:
    """An 8-bit RLE BMP of side x side pixels in runs of one pixel."""
    pixels = (b"\x01\x07" * side + b"\x00\x00") * side + b"\x00\x01"
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


# name -> maker; the reliability run's four (GIF comments, PNG chunks, TIFF pages, WebP frames) first.
CRAFTED = {
    "gif_60000_comment_blocks.gif": gif_comment_blocks,
    "png_100000_chunks.png": png_chunks,
    "tiff_1200_pages.tiff": tiff_pages,
    "webp_1200_frames.webp": webp_frames,
    "gif_60000_comment_extensions.gif": gif_comment_extensions,
    "gif_5000_frames.gif": lambda: gif_frames(MAX_FRAMES + 4000),
    "tiff_1000_pages_of_1000_tags.tiff": tiff_tags,
    "jpeg_1000000_markers.jpg": jpeg_markers,
    "jpeg_20mb_stray_bytes.jpg": jpeg_stray_bytes,
    "jpeg_10000_scans.jpg": jpeg_scans,
    "ppm_20mb_comment.ppm": ppm_long_comment,
    "ppm_plain_1500px.ppm": ppm_plain,
    "ppm_maxval_1000_1500px.ppm": ppm_sixteen_bit,
    "bmp_rle_3000px_one_pixel_runs.bmp": bmp_rle_runs,
}


def write_crafted(folder: Path) -> dict[str, Path]:
    """Every crafted file written into `folder`: {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, make in CRAFTED.items():
        paths[name] = folder / name
        paths[name].write_bytes(make())
    return paths


def time_load(path: Path, repeats: int) -> tuple[float, str]:
    """(median seconds of `load_image` over `repeats` runs, what it answered)."""
    from demo.uploads import load_image
    from mlvision.errors import BadImage

    seconds, answer = [], ""
    for _ in range(repeats):
        start = time.perf_counter()
        try:
            image, notes = load_image(path)
            answer = f"decoded {image.size[0]}x{image.size[1]}" + (f" ({'; '.join(notes)})" if notes else "")
        except BadImage as error:
            answer = f"refused: {error}"
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds), answer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="keep the files here (default: a temporary folder)")
    args = parser.parse_args(argv)
    import tempfile

    with tempfile.TemporaryDirectory() as temp:
        paths = write_crafted(args.out or Path(temp))
        print(f"{'file':38} {'MB':>6} {'median s':>9}  answer")
        for name, path in paths.items():
            seconds, answer = time_load(path, args.repeats)
            print(f"{name:38} {path.stat().st_size / 2**20:6.1f} {seconds:9.3f}  {answer[:110]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
