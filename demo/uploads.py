"""Upload decoding: every image a visitor sends goes through `load_image`, the one place that deals with bad files.

It turns anything Gradio or a client hands over (a path, bytes, a PIL image) into an RGB image
plus notes on what was converted, or raises `BadImage` (mlvision/errors.py) with a message for
the person who uploaded it.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mlvision.errors import BadImage

MAX_FILE_BYTES = 25 * 1024 * 1024  # larger uploads are refused before decoding (and by Gradio's max_file_size)
MAX_PIXELS = 40_000_000  # decompression-bomb limit (width * height)
MAX_ASPECT = 20.0  # longer side / shorter side; beyond this the image is refused
MAX_FRAMES = 1000  # animations with more frames are refused (counted without decoding; only frame 1 is used)
# The decoders Pillow may use. Everything else (EPS/PS and PDF, which start Ghostscript; ICO, PSD, ...)
# is refused before a decoder sees it. PPM also covers PBM and PGM; JPEG also opens MPO (many phone photos).
FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF", "PPM")
ACCEPTED = "PNG, JPEG, GIF, WebP, BMP, TIFF or PPM"

# A path as it appears in an error text: /a/b..., ~/a/b, C:\a\b. Messages for visitors never show server paths.
_PATH = re.compile(r"(?:(?<![\w.~])(?:~)?/(?:[^\s/'\"()<>,;:]+/)*[^\s/'\"()<>,;:]+)|(?:\b[A-Za-z]:\\[^\s'\"()<>,;]+)")
_OBJECT = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def public_text(text: str, limit: int = 300) -> str:
    """`text` fit to show a visitor: server paths become <path>, object reprs become <upload>, long text is cut.

    Why: decoder and framework messages can carry the server's file names (Gradio's cache folder,
    the Python installation); the demo's own messages never need them.
    """
    text = _OBJECT.sub("<upload>", _PATH.sub("<path>", str(text)))
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------------
# Image validation: every upload goes through here.
# --------------------------------------------------------------------------------------------------
def _flatten_alpha(image: Image.Image) -> Image.Image:
    """Composite a transparent image onto white (what a viewer shows), returning RGB."""
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_rgb(image: Image.Image, notes: list[str]) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            array = array / 65535.0 * 255.0  # 16-bit: scale the full range to 8 bits
            notes.append("16-bit image: scaled to 8 bits")
        else:
            low, high = float(array.min()), float(array.max())
            array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
            notes.append(f"{'32-bit integer' if mode == 'I' else 'floating-point'} image: rescaled min..max to 8 bits")
        return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        notes.append("transparent image: composited onto white")
        return _flatten_alpha(image)
    if mode == "CMYK":
        notes.append("CMYK image: converted to RGB")
    return image.convert("RGB")


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    """Position after a GIF data sub-block chain (length-prefixed blocks ending with a 0 length)."""
    while pos < len(data):
        size = data[pos]
        pos += 1
        if size == 0:
            break
        pos += size
    return pos


def gif_frames(data: bytes, stop: int) -> int:
    """Frames (image descriptors) in a GIF, counted by walking its blocks without decoding any, up to `stop`.

    Why not Pillow's `n_frames`: it walks every frame in Python before answering, so a 9 MB GIF of
    400,000 one-pixel frames kept a worker busy for seconds; this walk stops at `stop`.
    A damaged tail just ends the count (Pillow decodes the first frame, or says it is corrupt).
    """
    if len(data) < 13 or data[:3] != b"GIF":
        return 1
    pos = 13
    if data[10] & 0x80:  # global colour table
        pos += 3 * 2 ** ((data[10] & 0x07) + 1)
    frames = 0
    while pos < len(data) and frames < stop:
        block = data[pos]
        if block == 0x21:  # extension: label, then sub-blocks
            pos = _skip_sub_blocks(data, pos + 2)
        elif block == 0x2C:  # image descriptor: 9 bytes, local colour table, LZW code size, sub-blocks
            if pos + 10 > len(data):
                break
            flags = data[pos + 9]
            pos += 10
            if flags & 0x80:
                pos += 3 * 2 ** ((flags & 0x07) + 1)
            pos = _skip_sub_blocks(data, pos + 1)
            frames += 1
        else:  # 0x3B trailer, or something that is not a block: the end
            break
    return max(frames, 1)


def count_frames(image: Image.Image, data: bytes | None) -> int:
    """Frames of an opened upload, counted without decoding them; stops counting at MAX_FRAMES + 1.

    GIF: walked here (`gif_frames`). TIFF: one IFD after the other (Pillow reads tags, never pixels),
    so a broken later IFD raises here and becomes a BadImage. PNG (APNG), WebP and MPO: the count
    in the file's header, which Pillow reads at open.
    """
    if image.format == "GIF" and data is not None:
        return gif_frames(data, MAX_FRAMES + 1)
    if image.format == "TIFF":
        frames = 1
        try:
            while frames <= MAX_FRAMES:
                image.seek(frames)
                frames += 1
        except EOFError:
            pass
        image.seek(0)
        return frames
    return int(getattr(image, "n_frames", 1) or 1)


def _open(data: bytes) -> Image.Image:
    """Identify an upload with the allowed decoders only (FORMATS); every failure is a BadImage."""
    try:
        return Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise BadImage(
            f"The image is too large to decode safely (over {MAX_PIXELS:,} pixels): "
            "it looks like a decompression bomb. Resize it and try again."
        ) from None
    except UnidentifiedImageError:
        raise BadImage(f"The file is not an image the demo accepts: upload a {ACCEPTED} file.") from None
    except Exception as error:  # noqa: BLE001 - any decoder failure (struct.error, TypeError, ...) is a bad upload
        raise BadImage(f"The file cannot be read as an image ({public_text(error, 120)}).") from None


def _read(source) -> bytes:
    """The bytes of a path or bytes upload, refusing missing, empty and oversized files."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        path = Path(source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", source))
        if not path.is_file():
            raise BadImage("The upload did not arrive: try uploading again.")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise BadImage(
                f"The file is {size / 2**20:.0f} MB; the demo accepts images up to {MAX_FILE_BYTES / 2**20:.0f} MB."
            )
        data = path.read_bytes()
    if not data:
        raise BadImage("The uploaded file is empty (0 bytes): choose an image file.")
    if len(data) > MAX_FILE_BYTES:
        raise BadImage(f"The file is larger than {MAX_FILE_BYTES / 2**20:.0f} MB.")
    return data


def load_image(source) -> tuple[Image.Image, list[str]]:
    """Decode an upload (path, bytes or PIL image) into an RGB PIL image plus notes on what was done.

    Raises `BadImage` with a clear message (never a server path) for: no upload, an empty file, a
    file that is too large, a non-image file or a format outside FORMATS (EPS, PDF, ... never reach
    a decoder, so Ghostscript is never started), a truncated or corrupt image (whatever the decoder
    raises: OSError, TypeError, struct.error, ...), a decompression bomb, an animation of more than
    MAX_FRAMES frames, an image of extreme aspect ratio (> 20:1, refused rather than squashed or
    padded). Converted (with a note): 16-bit and 32-bit images, CMYK, RGBA/LA/transparent palettes
    (onto white), palette, 1-bit, animated images (first frame only; the others are never decoded),
    EXIF-rotated photos (rotated upright).

    Safe to call from many threads at once: it changes no global state (no `warnings` filters,
    which are process-wide) and the size checks below are explicit instead.
    """
    notes: list[str] = []
    if source is None or (isinstance(source, str) and not source.strip()):
        raise BadImage(f"No image uploaded: choose an image file ({ACCEPTED}), or wait until its upload has finished.")
    data = None
    if isinstance(source, Image.Image):
        image = source
    else:
        data = _read(source)
        image = _open(data)
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage(f"The image has no pixels ({width}x{height}).")
    if width * height > MAX_PIXELS:
        raise BadImage(
            f"The image is {width}x{height} = {width * height:,} pixels; the limit is {MAX_PIXELS:,} "
            "(a decompression-bomb guard). Resize it and try again."
        )
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise BadImage(
            f"The image is {width}x{height}: its aspect ratio is beyond {MAX_ASPECT:.0f}:1, and squashing "
            "it to a square would make the prediction meaningless. Crop it closer to square and try again."
        )
    try:
        frames = count_frames(image, data)
        if frames > MAX_FRAMES:
            raise BadImage(
                f"The animation has more than {MAX_FRAMES:,} frames; the demo reads only the first frame of "
                f"animations up to {MAX_FRAMES:,} frames. Upload a still image (or save the first frame) instead."
            )
        if frames > 1:
            notes.append(f"animated image ({frames} frames): used the first frame")
        image.load()  # the first frame only: the file is positioned there (count_frames seeks back)
        if image.size != (width, height) or image.size[0] * image.size[1] > MAX_PIXELS:
            raise BadImage("The image's frame size differs from its header: the file is corrupt.")
        transposed = ImageOps.exif_transpose(image)
        if transposed is not None and transposed.size != image.size:
            notes.append("rotated upright from its EXIF orientation")
        image = transposed if transposed is not None else image
        image = _to_rgb(image, notes)
        image.load()
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage("The image is too large to decode safely (decompression bomb).") from None
    except Exception as error:  # noqa: BLE001 - truncated / corrupt data (or a broken later frame) fails here
        raise BadImage(
            f"The image file is truncated or corrupt and cannot be decoded ({public_text(error, 120)}). "
            "Re-save or re-download it and try again."
        ) from None
    if width * height == 1:
        notes.append("1x1 image: upscaled to the model's input size (the prediction says little)")
    return image.copy(), notes


__all__ = [
    "BadImage",
    "load_image",
    "public_text",
    "FORMATS",
    "MAX_FILE_BYTES",
    "MAX_PIXELS",
    "MAX_ASPECT",
    "MAX_FRAMES",
]
