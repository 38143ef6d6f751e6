"""Walk an upload's container (its blocks, chunks, segments or pages) before any decoder sees it.

Why this exists: Pillow's decoders are fast C code, but several of its *parsers* are Python loops
over every block of a file, and some of those loops cost more than linear time. Files under the
25 MB upload limit that are made of many tiny blocks kept a server thread busy for seconds to
minutes (measured with `python -m demo.crafted`, Pillow 12.3, 2 cores, nothing else running):

- a GIF of 60,000 comment sub-blocks: 35-160 s inside `Image.open` (each block is appended to
  the comment with `bytes +=`, so the cost grows with the square of the comment);
- a PNG of 1,000,000 unknown chunks: 2.9 s; a TIFF of 1,000 pages x 1,000 tags: 4.1 s;
- a PPM whose header holds a 20 MB comment: 5.4 s (the header is read one byte at a time).

So each allowed format's structure is counted here first, with loops that stop as soon as a limit
is passed (the cost of a walk is bounded by the limit, not by the file), and a file over a limit is
refused with a message that says what it holds and what to do. Pixel data is never decoded here.
WebP and BMP need no walk: libwebp parses WebP containers in C (1,000,000 unknown chunks: 0.00 s),
and a BMP has one fixed header. What Pillow then decodes with a *Python* decoder (plain PPM, PPM
with an unusual maximum value, RLE-compressed BMP) is bounded in uploads.py by `check_decoder`.

Every limit leaves ordinary files far inside it: a camera JPEG has tens of segments and 1-15
scans, a PNG from libpng has one IDAT chunk per 8 KB (3,200 for 25 MB), an animated GIF one
extension per frame plus a few, a multi-page TIFF 10-20 tags per page.
"""

from __future__ import annotations

import struct

from mlvision.errors import BadImage

MAX_FRAMES = 1000  # animations and multi-page files with more frames are refused (only frame 1 is used)
MAX_GIF_EXTENSIONS = 4 * MAX_FRAMES  # extension blocks (graphic control, comment, application ...)
MAX_GIF_EXTENSION_BYTES = 256 * 1024  # their payload in all
MAX_PNG_CHUNKS = 20_000
MAX_JPEG_MARKERS = 1_000  # markers before the first scan (APPn, COM, DQT, DHT ..., fill bytes)
MAX_JPEG_STRAY_BYTES = 64 * 1024  # bytes between them that belong to no marker (Pillow skips them one by one)
MAX_JPEG_SCANS = 64  # progressive scans: the decoder passes over every block of the image once per scan
MAX_TIFF_ENTRIES = 32_768  # tags, summed over every page
MAX_PNM_HEADER_BYTES = 64 * 1024  # magic number, sizes and maximum value, with their comments


def _too_many(what: str, found: str, limit: int, fix: str) -> BadImage:
    return BadImage(f"The {what} holds {found} (the demo reads at most {limit:,}): {fix}")


RESAVE = "re-save it as a plain PNG or JPEG and upload that."


def check_frames(frames: int) -> None:
    """Refuse an animation or multi-page file of more than MAX_FRAMES frames (only its first is ever used)."""
    if frames > MAX_FRAMES:
        raise BadImage(
            f"The animation has more than {MAX_FRAMES:,} frames; the demo reads only the first frame of "
            f"animations up to {MAX_FRAMES:,} frames. Upload a still image (or save the first frame) instead."
        )


# -- GIF ---------------------------------------------------------------------------------------------
def _sub_blocks_end(data: bytes, pos: int) -> tuple[int, int, int]:
    """(position after a GIF sub-block chain, its payload bytes, its sub-blocks)."""
    payload = blocks = 0
    while pos < len(data):
        size = data[pos]
        pos += 1
        if size == 0:
            break
        pos += size
        payload += size
        blocks += 1
    return pos, payload, blocks


def gif_frames(data: bytes, stop: int = MAX_FRAMES + 1) -> int:
    """Frames (image descriptors) in a GIF, counted by walking its blocks without decoding any, up to `stop`.

    Refuses (BadImage) a GIF with more extension blocks or extension bytes than the limits, as soon as
    the walk passes them. Why not Pillow's `n_frames`: it walks every frame in Python before answering.
    A damaged tail just ends the count (Pillow then decodes the first frame, or says it is corrupt).
    """
    if len(data) < 13 or data[:3] != b"GIF":
        return 1
    pos = 13
    if data[10] & 0x80:  # global colour table
        pos += 3 * 2 ** ((data[10] & 0x07) + 1)
    frames = extensions = extension_bytes = 0
    while pos < len(data) and frames < stop:
        block = data[pos]
        if block == 0x21:  # extension: label, then sub-blocks
            pos, payload, _ = _sub_blocks_end(data, pos + 2)
            extensions += 1
            extension_bytes += payload
            if extensions > MAX_GIF_EXTENSIONS:
                raise _too_many("GIF", f"over {MAX_GIF_EXTENSIONS:,} extension blocks", MAX_GIF_EXTENSIONS, RESAVE)
            if extension_bytes > MAX_GIF_EXTENSION_BYTES:
                raise BadImage(
                    f"The GIF holds over {MAX_GIF_EXTENSION_BYTES // 1024} KB of comments or application data "
                    f"(the demo reads at most {MAX_GIF_EXTENSION_BYTES // 1024} KB): {RESAVE}"
                )
        elif block == 0x2C:  # image descriptor: 9 bytes, local colour table, LZW code size, sub-blocks
            if pos + 10 > len(data):
                break
            flags = data[pos + 9]
            pos += 10
            if flags & 0x80:
                pos += 3 * 2 ** ((flags & 0x07) + 1)
            pos = _sub_blocks_end(data, pos + 1)[0]
            frames += 1
        else:  # 0x3B trailer, or something that is not a block: the end
            break
    return max(frames, 1)


# -- PNG ---------------------------------------------------------------------------------------------
def _check_png(data: bytes) -> None:
    pos, chunks = 8, 0
    while pos + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise _too_many("PNG", f"over {MAX_PNG_CHUNKS:,} chunks", MAX_PNG_CHUNKS, RESAVE)
        if kind == b"IEND":
            return
        pos += 12 + length


# -- JPEG --------------------------------------------------------------------------------------------
_STANDALONE = {0x01, 0xD8, *range(0xD0, 0xD8)}  # markers without a length field (TEM, SOI, RST0-7)


def _check_jpeg(data: bytes) -> None:
    """Markers before the first scan are walked (Pillow parses them in Python, one byte at a time where
    there is stray data between them); scans are counted with `bytes.count` (C speed): a 0xFFDA pair cannot
    occur inside entropy-coded data, where every 0xFF byte is followed by 0x00 or a restart marker."""
    pos, markers, stray = 2, 0, 0
    while pos + 1 < len(data):
        if data[pos] != 0xFF:  # stray bytes: skipped by find (C speed) and counted
            found = data.find(b"\xff", pos)
            found = len(data) if found < 0 else found
            stray += found - pos
            pos = found
            if stray > MAX_JPEG_STRAY_BYTES:
                raise BadImage(
                    f"The JPEG holds over {MAX_JPEG_STRAY_BYTES // 1024} KB of stray data between its header "
                    f"segments: the file is damaged or crafted; {RESAVE}"
                )
            continue
        marker = data[pos + 1]
        if marker in (0xDA, 0xD9):  # start of scan, end of image
            break
        markers += 1
        if markers > MAX_JPEG_MARKERS:
            found = f"over {MAX_JPEG_MARKERS:,} markers before its image data"
            raise _too_many("JPEG", found, MAX_JPEG_MARKERS, RESAVE)
        if marker in (0xFF, 0x00) or marker in _STANDALONE:  # fill byte, escaped 0xFF, or no length field
            pos += 1 if marker == 0xFF else 2
        elif pos + 4 <= len(data):
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
        else:
            break
    scans = data.count(b"\xff\xda")
    if scans > MAX_JPEG_SCANS:
        raise _too_many("JPEG", f"{scans:,} scans", MAX_JPEG_SCANS, RESAVE)


# -- TIFF --------------------------------------------------------------------------------------------
def tiff_pages(data: bytes, stop: int = MAX_FRAMES + 1) -> int:
    """Pages of a TIFF (classic or BigTIFF), counted by walking its chain of directories up to `stop`.

    Refuses a file whose directories hold more than MAX_TIFF_ENTRIES tags in all (Pillow reads every tag of
    every directory it visits, in Python), that loops back to a directory it already listed, or whose directory
    is empty or lies outside the file (as Pillow's own page walk refused such files).
    """
    order = "<" if data[:2] == b"II" else ">"
    big = struct.unpack_from(order + "H", data, 2)[0] == 43
    count_format, entry_size, offset_format = ("Q", 20, "Q") if big else ("H", 12, "I")
    offset = struct.unpack_from(order + offset_format, data, 8 if big else 4)[0]
    pages = entries = 0
    seen = set()
    while offset and pages < stop:
        if offset in seen:
            raise BadImage("The TIFF's pages loop back to a page already read: the file is corrupt; " + RESAVE)
        seen.add(offset)
        count_size = struct.calcsize(count_format)
        count = struct.unpack_from(order + count_format, data, offset)[0] if offset + count_size <= len(data) else 0
        next_at = offset + count_size + count * entry_size
        if count == 0 or next_at + struct.calcsize(offset_format) > len(data):
            raise BadImage(
                f"The TIFF's page {pages + 1} is empty, cut off or points outside the file: the file is truncated "
                f"or corrupt; {RESAVE}"
            )
        entries += count
        if entries > MAX_TIFF_ENTRIES:
            raise _too_many("TIFF", f"over {MAX_TIFF_ENTRIES:,} tags", MAX_TIFF_ENTRIES, RESAVE)
        pages += 1
        offset = struct.unpack_from(order + offset_format, data, next_at)[0]
    return max(pages, 1)


# -- PPM / PGM / PBM ---------------------------------------------------------------------------------
def _check_pnm(data: bytes) -> None:
    """The header (magic number, width, height and maximum value, each perhaps after comment lines) must end
    within MAX_PNM_HEADER_BYTES: Pillow reads it one byte at a time. Comments are skipped with `bytes.find`."""
    tokens = 1 if data[1:2] in b"14" else 2 if data[1:2] in b"fF" else 3  # after the magic number
    pos = 2
    while tokens and pos < len(data) and pos < MAX_PNM_HEADER_BYTES:
        byte = data[pos : pos + 1]
        if byte == b"#":
            ends = [end for end in (data.find(b"\n", pos), data.find(b"\r", pos)) if end >= 0]
            pos = min(ends) + 1 if ends else len(data)
        elif byte in b" \t\n\v\f\r":
            pos += 1
        else:
            while pos < MAX_PNM_HEADER_BYTES and pos < len(data) and data[pos : pos + 1] not in b" \t\n\v\f\r#":
                pos += 1
            tokens -= 1
    if tokens and pos >= MAX_PNM_HEADER_BYTES:
        raise BadImage(
            f"The PPM/PGM/PBM header (with its comments) is longer than {MAX_PNM_HEADER_BYTES // 1024} KB: "
            "remove the comments or re-save it as PNG, and upload that."
        )


# --------------------------------------------------------------------------------------------------
def check_container(data: bytes) -> int:
    """Walk the container of an upload whose bytes start like an allowed format; refuse (BadImage) one over a
    limit (frames and pages included), and return the frames or pages counted where the walk counts them
    (GIF, TIFF), else 0.

    Formats are told by their magic bytes, as Pillow's own `_accept` functions tell them; anything else is
    left to `Image.open(formats=...)`, which refuses it."""
    frames = 0
    if data[:4] == b"GIF8":
        frames = gif_frames(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        _check_png(data)
    elif data[:3] == b"\xff\xd8\xff":
        _check_jpeg(data)
    elif data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+") and len(data) >= 16:
        frames = tiff_pages(data)
    elif data[:1] == b"P" and data[1:2] in b"123456fF" and len(data) > 2:
        _check_pnm(data)
    check_frames(frames)
    return frames


__all__ = ["MAX_FRAMES", "check_container", "check_frames", "gif_frames", "tiff_pages"]
