"""Upload decoding: every image a visitor sends goes through `load_image`, the one place that deals with bad files.

It turns anything Gradio or a client hands over (a path, bytes, a PIL image) into an RGB image
plus notes on what was converted, or raises `BadImage` (mlvision/errors.py) with a message for
the person who uploaded it.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, ImageSequence, UnidentifiedImageError

from mlvision.errors import BadImage

MAX_FILE_BYTES = 25 * 1024 * 1024  # larger uploads are refused before decoding
MAX_PIXELS = 40_000_000  # decompression-bomb limit (width * height)
MAX_ASPECT = 20.0  # longer side / shorter side; beyond this the image is refused


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


def load_image(source) -> tuple[Image.Image, list[str]]:
    """Decode an upload (path, bytes or PIL image) into an RGB PIL image plus notes on what was done.

    Raises `BadImage` with a clear message for: no upload, an empty file, a file that is too large,
    a non-image file, a truncated or corrupt image, a decompression bomb, an image of extreme
    aspect ratio (> 20:1, refused rather than squashed or padded). Converted (with a note): 16-bit
    and 32-bit images, CMYK, RGBA/LA/transparent palettes (onto white), palette, 1-bit, animated
    images (first frame), EXIF-rotated photos (rotated upright).
    """
    notes: list[str] = []
    if source is None or (isinstance(source, str) and not source.strip()):
        raise BadImage("No image uploaded: choose an image file (PNG, JPEG, GIF, WebP, BMP, TIFF ...).")
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        else:
            path = Path(source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", source))
            if not path.is_file():
                raise BadImage(f"The upload did not arrive (no file at {path.name}): try uploading again.")
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
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise BadImage(
                f"The image is too large to decode safely (over {MAX_PIXELS:,} pixels): "
                "it looks like a decompression bomb. Resize it and try again."
            ) from None
        except UnidentifiedImageError:
            raise BadImage(
                "The file is not an image (or a format Pillow cannot read): "
                "upload a PNG, JPEG, GIF, WebP, BMP or TIFF file."
            ) from None
        except Exception as error:  # noqa: BLE001 - any decoder failure is a bad upload
            raise BadImage(f"The file cannot be read as an image ({error}).") from None
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
    if getattr(image, "is_animated", False) and getattr(image, "n_frames", 1) > 1:
        notes.append(f"animated image ({image.n_frames} frames): used the first frame")
        image = next(iter(ImageSequence.Iterator(image)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.load()
            transposed = ImageOps.exif_transpose(image)
        if transposed is not None and transposed.size != image.size:
            notes.append("rotated upright from its EXIF orientation")
        image = transposed if transposed is not None else image
        image = _to_rgb(image, notes)
        image.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage("The image is too large to decode safely (decompression bomb).") from None
    except Exception as error:  # noqa: BLE001 - truncated / corrupt data fails here
        raise BadImage(
            f"The image file is truncated or corrupt and cannot be decoded ({error}). "
            "Re-save or re-download it and try again."
        ) from None
    if width * height == 1:
        notes.append("1x1 image: upscaled to the model's input size (the prediction says little)")
    return image.copy(), notes


__all__ = ["BadImage", "load_image", "MAX_FILE_BYTES", "MAX_PIXELS", "MAX_ASPECT"]
