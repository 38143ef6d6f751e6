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

from demo.containers import MAX_FRAMES, check_container, check_frames
from mlvision.errors import BadImage

MAX_FILE_BYTES = 25 * 1024 * 1024  # larger uploads are refused before decoding (and by Gradio's max_file_size)
MAX_PIXELS = 40_000_000  # decompression-bomb limit (width * height)
MAX_ASPECT = 20.0  # longer side / shorter side; beyond this the image is refused
# Decoders Pillow runs in Python (plain PPM, RLE BMP, ...) get a smaller budget (see `check_decoder`).
MAX_PYTHON_DECODER_PIXELS = 250_000
MAX_PYTHON_DECODER_BYTES = 4 * 1024 * 1024
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


def count_frames(image: Image.Image, walked: int) -> int:
    """Frames of an opened upload, counted without decoding them. GIF and TIFF: the count the container walk
    made (`check_container`, which stops one past MAX_FRAMES); PNG (APNG), WebP and MPO: the count in the
    file's header, which Pillow reads at open."""
    if image.format in ("GIF", "TIFF") and walked:
        return walked
    return int(getattr(image, "n_frames", 1) or 1)


def check_decoder(image: Image.Image, data: bytes) -> None:
    """Refuse an image that Pillow would decode with one of its *Python* decoders beyond what they do in about a
    second: plain (ASCII) PPM/PGM/PBM, PPM with a maximum value other than 255, RLE-compressed BMP.

    Which decoder runs is Pillow's own choice (`image.tile`), and its Python decoders are the ones registered
    in `Image.DECODERS`; measured (`python -m demo.crafted`, idle): a plain 1500x1500 PPM took 4.5 s, an
    RLE BMP of 3000x3000 one-pixel runs 4.2 s, i.e. about 2 µs per value.
    """
    decoders = {tile[0] for tile in image.tile or ()}
    if not decoders & set(Image.DECODERS):
        return
    width, height = image.size
    if width * height > MAX_PYTHON_DECODER_PIXELS or len(data) > MAX_PYTHON_DECODER_BYTES:
        kind = f"{image.format} in a slow encoding ({', '.join(sorted(decoders & set(Image.DECODERS)))})"
        raise BadImage(
            f"The image is a {kind} of {width}x{height} pixels and {len(data) / 2**20:.1f} MB; the demo decodes "
            f"such files only up to {MAX_PYTHON_DECODER_PIXELS:,} pixels and {MAX_PYTHON_DECODER_BYTES // 2**20} MB: "
            "re-save it as PNG or JPEG and upload that."
        )


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
    data, walked = None, 0
    if isinstance(source, Image.Image):
        image = source
    else:
        data = _read(source)
        walked = check_container(data)  # blocks, chunks, segments and pages counted before any parser runs
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
        if data is not None:
            check_decoder(image, data)
        frames = count_frames(image, walked)
        check_frames(frames)
        if frames > 1:
            notes.append(f"animated image ({frames} frames): used the first frame")
        image.load()  # the first frame only: nothing has moved the file away from it
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
