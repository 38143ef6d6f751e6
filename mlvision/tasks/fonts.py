"""The three font tasks: digits 0-9 (font_digits), capitals A-Z (font_letters) and small letters a-z (font_lower)
rendered from TrueType fonts.

The fonts come from two Debian packages (fonts-aenigma: 465 display fonts; fonts-freefont-ttf: 12
FreeSans/Serif/Mono), read in memory from the pinned .debs (`mlvision/sources.py`). Each image is
28x28 white on black, with a seeded random size (longer side 19-22 px), shift (+-2 px) and rotation
(+-10 deg), so the data are the same on every machine.

Font rules (`_renders_every_class`, `PICTURE_FONTS`, `font_split`): a font is used for a task only if
every class has an inked glyph, none is the .notdef box, and no two classes share a glyph; dingbat and
picture fonts are listed by name in `PICTURE_FONTS`. Fonts of one design family never straddle two
splits: font_digits has 269/100/77 fonts, 2/2/3 renders each, 5,380/2,000/2,310 images; font_letters
266/100/77 fonts, one render each, 6,916/2,600/2,002; font_lower (issue 32) drops besides the all-caps faces
(`_is_all_caps`: their a-z are their A-Z) and keeps 240/94/76 fonts, one render each, 6,240/2,444/1,976.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image

from .. import sources
from ..errors import UnknownNameError
from .splits import SEED, SPLITS, Splits, cut_units
from .task import DIGITS, LETTERS, LOWER_LETTERS

# Where the fonts lie inside each font .deb (sources.FONT_DEBS pins package versions and .deb hashes).
FONT_FOLDERS = {
    "fonts-aenigma": "usr/share/fonts/truetype/aenigma/",
    "fonts-freefont-ttf": "usr/share/fonts/truetype/freefont/",
}
# Appending a task keeps the others' images: each image's seed holds its task's index in this dict.
FONT_TASK_CLASSES = {"font_digits": DIGITS, "font_letters": LETTERS, "font_lower": LOWER_LETTERS}
# Fonts whose glyphs are not the characters they stand for: pictures, codes or patterns in place of
# letters (dingbats), glyphs turned sideways, or letters swapped at random. Picked once by looking at
# every font's 36 glyphs (a contact sheet); no automatic test tells a dingbat from a wild display face.
PICTURE_FONTS = frozenset(
    {
        "3dlet.ttf",  # letters drawn on cubes, illegible at 28 px
        "90stars.ttf",  # stars
        "bin01st.ttf",  # binary codes
        "binaryt.ttf",  # binary codes round a letter too small to read at 28 px
        "binaryx.ttf",
        "binx01s.ttf",  # binary codes
        "bitbttf.ttf",  # pictograms
        "claw1.ttf",  # claw marks
        "claw2.ttf",  # claw marks
        "dblbogey.ttf",  # grey patterns
        "encapsul.ttf",  # every glyph the same capsule
        "entlayrb.ttf",  # hatch patterns
        "fauxsnow.ttf",  # snowflakes
        "graze.ttf",  # slanted bars
        "hdmaker.ttf",  # heads
        "lineding.ttf",  # line dingbats
        "mobilize.ttf",  # several letters drawn as the same ring
        "nucleus.ttf",  # concentric circles
        "numskull.ttf",  # skulls
        "qbicle1.ttf",  # cubes
        "qbicle2.ttf",
        "qbicle3.ttf",
        "qbicle4.ttf",
        "snailets.ttf",  # snails for letters
        "symmetry.ttf",  # kaleidoscope patterns
        "tearful.ttf",  # tear drops
        "vertigo.ttf",  # glyphs turned sideways
        "vertigo2.ttf",
        "whatever.ttf",  # letters swapped for other letters
        "xmaslght.ttf",  # christmas lights
    }
)
FONT_RENDER_SIZE = 64  # glyphs are rasterised once at this pixel size, then scaled down per image
FONT_IMAGE_SIZE = 28
FONT_BOX = (19, 22)  # the glyph's longer side is scaled to a seeded random length in this range (pixels)
FONT_MAX_ROTATION = 10.0  # degrees, seeded random in [-10, 10]
FONT_MAX_SHIFT = 2  # pixels: the glyph's centre is moved by up to this much from the image centre
FONT_SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # of the font families
# Renders per (font, class) in each split: enough images for the study's subsets (1000/1000/2000).
FONT_RENDERS = {
    "font_digits": {"train": 2, "validation": 2, "test": 3},
    "font_letters": {"train": 1, "validation": 1, "test": 1},
    "font_lower": {"train": 1, "validation": 1, "test": 1},
}
# An all-caps face draws most small letters with its capitals' glyphs: in font_lower it would teach "a" as "A".
# Of the 442 fonts that draw a-z, 361 share no glyph with their capitals, 22 one, 29 two to twelve and 30 thirteen
# or more (all-caps and small-caps faces, 6 of them all 26): the cut is half the alphabet, and drops those 30.
ALL_CAPS_MIN_SAME = 13
_NOTDEF_PROBE = "\U0010fffd"  # a code point no font maps: FreeType gives the .notdef glyph


def _font_files() -> dict[str, bytes]:
    """Font file name (e.g. 'bocuma.ttf') -> bytes, from the pinned font .debs, read in memory."""
    fonts: dict[str, bytes] = {}
    for package, version in sources.FONT_DEBS.items():
        deb = sources.fetch_deb(package, version)
        for path, data in sources.read_deb_folder(deb, FONT_FOLDERS[package], ".ttf").items():
            fonts[path.rsplit("/", 1)[-1]] = data
    return fonts


def _glyph_mask(font, char: str) -> np.ndarray:
    """The anti-aliased glyph of `char`, cropped to its ink (0x0 when it has none)."""
    mask = font.getmask(char, mode="L")
    width, height = mask.size
    if width * height == 0:
        return np.zeros((0, 0), np.uint8)
    a = np.asarray(mask, dtype=np.uint8).reshape(height, width)
    rows, cols = np.flatnonzero(a.max(1)), np.flatnonzero(a.max(0))
    if len(rows) == 0:
        return np.zeros((0, 0), np.uint8)
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _font_family(font) -> str:
    """A font's design family: the first word of its family name ('Bocuma Dent BRK' -> 'bocuma').

    Variants of one design (outline, shadow, thin, 'O', '2'...) share it, so they land in one split.
    """
    words = (font.getname()[0] or "").replace(" BRK", "").split()
    return words[0].lower() if words else ""


@sources.per_downloads_folder
def _font_glyphs() -> dict[str, tuple[str, dict[str, np.ndarray]]]:
    """Font name -> (family, {char: glyph mask}) for every font FreeType can open, all 62 classes.

    Rasterising ~450 fonts takes seconds, so it is done once per process and downloads folder (a
    preparation under another cache dir, as in the tests, reads its own .debs again).
    """
    from PIL import ImageFont

    out = {}
    for name, data in sorted(_font_files().items()):
        if name in PICTURE_FONTS:
            continue
        try:
            font = ImageFont.truetype(io.BytesIO(data), FONT_RENDER_SIZE)
            glyphs = {c: _glyph_mask(font, c) for c in DIGITS + LETTERS + LOWER_LETTERS + (_NOTDEF_PROBE,)}
        except OSError:  # not a font FreeType can read: unusable
            continue
        out[name] = (_font_family(font), glyphs)
    return out


def font_families() -> dict[str, str]:
    """Font file name -> design family (see `_font_family`), for every font the font tasks may use."""
    return {name: family for name, (family, _) in _font_glyphs().items()}


def _renders_every_class(glyphs: dict[str, np.ndarray], classes: tuple[str, ...]) -> bool:
    """The rule a font must pass to be used for a task (for its classes only):

    every class has a glyph with ink (no empty or all-faint glyph), no class's glyph is the .notdef
    glyph (a missing character drawn as a box), and no two classes have the same glyph (a font that
    draws '0' and 'O' alike is fine for font_digits, whose classes never meet an 'O').
    """

    def key(a: np.ndarray) -> tuple:
        return a.shape, (a > 127).tobytes()

    if any(glyphs[c].size == 0 or glyphs[c].max() < 128 for c in classes):
        return False
    keys = [key(glyphs[c]) for c in classes]
    notdef = glyphs[_NOTDEF_PROBE]
    if notdef.size and key(notdef) in keys:
        return False
    return len(set(keys)) == len(keys)


def _is_all_caps(glyphs: dict[str, np.ndarray]) -> bool:
    """True when at least ALL_CAPS_MIN_SAME of a font's a-z glyphs are pixel for pixel its A-Z glyphs."""
    return sum(np.array_equal(glyphs[c], glyphs[c.upper()]) for c in LOWER_LETTERS) >= ALL_CAPS_MIN_SAME


def font_split(task: str = "font_digits") -> dict[str, list[str]]:
    """{split: [font file names]} used by a font task; no font, nor any font family, is in two splits.

    Font families (see `_font_family`) are shuffled with a fixed seed and cut 60/20/20 into
    train/validation/test; the cut is the same for both font tasks (a validation font of
    font_digits is never a training font of font_letters). Each task then keeps the fonts of its
    part that pass `_renders_every_class` for its classes (font_lower: and are not all-caps, `_is_all_caps`).
    """
    if task not in FONT_TASK_CLASSES:
        raise UnknownNameError(f"not a font task: {task!r}; font tasks: {', '.join(FONT_TASK_CLASSES)}")
    glyphs = _font_glyphs()
    families = sorted({family for family, _ in glyphs.values()})
    split_of = cut_units(families, FONT_SPLIT_FRACTIONS, [SEED, 7])
    classes = FONT_TASK_CLASSES[task]

    def usable(g: dict[str, np.ndarray]) -> bool:
        return _renders_every_class(g, classes) and not (task == "font_lower" and _is_all_caps(g))

    return {split: [n for n, (fam, g) in glyphs.items() if split_of[fam] == split and usable(g)] for split in SPLITS}


def _render_glyph(glyph: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One 28x28 uint8 image: white glyph on black, scaled, rotated and shifted by `rng`."""
    box = rng.uniform(*FONT_BOX)
    angle = rng.uniform(-FONT_MAX_ROTATION, FONT_MAX_ROTATION)
    shift = rng.uniform(-FONT_MAX_SHIFT, FONT_MAX_SHIFT, size=2)
    height, width = glyph.shape
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    img = Image.fromarray(glyph).resize(size, Image.Resampling.LANCZOS)
    img = img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=0)
    # Shift, but never push ink out of the frame (a rotated box may be up to ~26 px across).
    w, h = img.size
    left = int(
        np.clip(round((FONT_IMAGE_SIZE - w) / 2 + shift[0]), min(0, FONT_IMAGE_SIZE - w), max(0, FONT_IMAGE_SIZE - w))
    )
    top = int(
        np.clip(round((FONT_IMAGE_SIZE - h) / 2 + shift[1]), min(0, FONT_IMAGE_SIZE - h), max(0, FONT_IMAGE_SIZE - h))
    )
    canvas = Image.new("L", (FONT_IMAGE_SIZE, FONT_IMAGE_SIZE), 0)
    canvas.paste(img, (left, top))
    return np.asarray(canvas, dtype=np.uint8)


def _build_fonts(task: str) -> Splits:
    """Every usable font of each split (`font_split`), each class, FONT_RENDERS[task][split] renders each.

    Each image's size, rotation and shift come from a generator seeded by (task, font, class, render
    index), so the data are the same on every machine and do not depend on which other fonts exist.
    """
    glyphs = _font_glyphs()
    classes = FONT_TASK_CLASSES[task]
    task_id = list(FONT_TASK_CLASSES).index(task)
    out = {}
    for s, (split, fonts) in enumerate(font_split(task).items()):
        images, labels = [], []
        for font in fonts:
            font_id = zlib.crc32(font.encode())
            for c, char in enumerate(classes):
                for k in range(FONT_RENDERS[task][split]):
                    rng = np.random.default_rng([SEED, task_id, font_id, c, k])
                    images.append(_render_glyph(glyphs[font][1][char], rng))
                    labels.append(c)
        order = np.random.default_rng([SEED, 98, task_id, s]).permutation(len(labels))
        out[split] = (np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order])
    return out


def build_font_digits() -> Splits:
    return _build_fonts("font_digits")


def build_font_letters() -> Splits:
    return _build_fonts("font_letters")


def build_font_lower() -> Splits:
    return _build_fonts("font_lower")


# Where both font tasks come from (one sentence, shared by their registry entries).
FONT_SOURCE = "Debian packages " + ", ".join(f"{p}={v}" for p, v in sources.FONT_DEBS.items()) + " (TrueType fonts)"
