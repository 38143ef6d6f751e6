"""The emoji tasks (issue 32): which Unicode emoji group an emoji belongs to, in two styles.

- emoji_color: drawn by Noto Color Emoji (colour bitmaps), 48x48 RGB;
- emoji_mono: the same emoji drawn by Symbola (black-and-white outlines), 48x48 grayscale.
Same labels, two styles: the pair is the "same label space, other style" relation on pictures, as mnist and
font_digits are on digits.

Labels: the eight emoji groups of Unicode's emoji-test.txt (from Debian's unicode-data, pinned) that hold more
than a handful of emoji (Flags has 5 single-character emoji, Component none). Emoji: every fully-qualified emoji
that is one character (with or without its emoji presentation selector), no skin-tone or ZWJ sequence, drawn by
both fonts (`usable_emoji`): 1,135 of the 1,372 in the eight groups.

Split by emoji: each emoji is one design, drawn in one split only; each group's emoji are shuffled (seeded) and cut
60/20/20. The pilot tried the stricter cut by Unicode subgroup (face-smiling, animal-mammal...: a model is tested
on kinds of emoji it never saw): the single adapter then barely beat the head (55.4 against 54.2 %, colour), a
task where an adapter learns nothing to merge. Emoji of one subgroup look alike (the clock faces), so part of a
test split is near a training emoji: scripts/task_pool_report.py counts them.

Each group gets EMOJI_IMAGES[split] images of a split, its emoji drawn in turn at a seeded size,
rotation and shift (the rarest group's emoji drawn most often), 2,800 / 400 / 480 images.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .. import sources
from ..errors import DataSourceError
from .splits import SEED, SPLITS, Splits, cut_units, in_turn

EMOJI_GROUPS = (
    "Smileys & Emotion",
    "People & Body",
    "Animals & Nature",
    "Food & Drink",
    "Travel & Places",
    "Activities",
    "Objects",
    "Symbols",
)
EMOJI_TEST = "usr/share/unicode/emoji/emoji-test.txt"
FONT_FILES = {  # package -> its font file, and the pixel size FreeType draws it at (the colour font's bitmaps: 109)
    "fonts-noto-color-emoji": ("usr/share/fonts/truetype/noto/NotoColorEmoji.ttf", 109),
    "fonts-symbola": ("usr/share/fonts/truetype/ancient-scripts/Symbola_hint.ttf", 96),
}
STYLE_FONT = {"emoji_color": "fonts-noto-color-emoji", "emoji_mono": "fonts-symbola"}
IMAGE_SIZE = 48
BOX = (36, 42)  # the emoji's longer side, seeded, pixels
MAX_ROTATION, MAX_SHIFT = 10.0, 2
# Images per (group, split): the group's emoji of that split taken in turn, a new seeded render each round, so that
# the groups are balanced whatever their number of emoji (Objects has 197, Activities 67).
EMOJI_IMAGES = {"train": 350, "validation": 50, "test": 60}
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # of each group's emoji
_NOTDEF_PROBE = "\U0010fffd"


def _deb_file(package: str, version: str, path: str) -> bytes:
    folder, name = path.rsplit("/", 1)
    files = sources.read_deb_folder(sources.fetch_deb(package, version), folder + "/", name.lower())
    return files[path]


@sources.per_downloads_folder
def emoji_list() -> list[tuple[str, str, str]]:
    """(group, subgroup, emoji) for every single-character fully-qualified emoji of EMOJI_GROUPS."""
    text = _deb_file(*sources.UNICODE_DATA_DEB, EMOJI_TEST).decode("utf-8")
    group = subgroup = ""
    out = []
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            codes, status = (part.strip() for part in line.split("#")[0].split(";"))
            points = [int(c, 16) for c in codes.split()]
            if status == "fully-qualified" and len([p for p in points if p != 0xFE0F]) == 1 and group in EMOJI_GROUPS:
                out.append((group, subgroup, "".join(map(chr, points))))
    if not out:
        raise DataSourceError(f"{EMOJI_TEST} of unicode-data lists no emoji: the package changed; check its pin")
    return out


def _fonts() -> dict[str, ImageFont.FreeTypeFont]:
    out = {}
    for task, package in STYLE_FONT.items():
        path, size = FONT_FILES[package]
        out[task] = ImageFont.truetype(io.BytesIO(_deb_file(package, sources.EMOJI_DEBS[package], path)), size)
    return out


def _draw(font: ImageFont.FreeTypeFont, emoji: str, color: bool) -> np.ndarray:
    """The emoji cropped to its ink: RGBA uint8 (colour) or an L mask (mono); 0x0 when nothing is drawn."""
    if color:
        canvas = Image.new("RGBA", (font.size * 2, font.size * 2), (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((font.size // 4, font.size // 4), emoji, font=font, embedded_color=True)
        a = np.asarray(canvas)
        ink = a[..., 3]
    else:
        mask = font.getmask(emoji.replace("\ufe0f", ""), mode="L")
        if mask.size[0] * mask.size[1] == 0:
            return np.zeros((0, 0), np.uint8)
        a = np.asarray(mask, dtype=np.uint8).reshape(mask.size[1], mask.size[0])
        ink = a
    rows, cols = np.flatnonzero(ink.max(1) > 127), np.flatnonzero(ink.max(0) > 127)
    if len(rows) == 0:
        return np.zeros((0, 0), np.uint8)
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


@sources.per_downloads_folder
def usable_emoji() -> tuple[list[tuple[str, str, str]], dict[str, dict[str, np.ndarray]]]:
    """The emoji both fonts draw (inked, not the .notdef glyph), and {task: {emoji: drawing}}."""
    fonts = _fonts()
    drawings: dict[str, dict[str, np.ndarray]] = {task: {} for task in STYLE_FONT}
    kept = []
    notdef = {task: _draw(font, _NOTDEF_PROBE, task == "emoji_color") for task, font in fonts.items()}
    for group, subgroup, emoji in emoji_list():
        drawn = {task: _draw(font, emoji, task == "emoji_color") for task, font in fonts.items()}
        if all(d.size and not (d.shape == notdef[t].shape and np.array_equal(d, notdef[t])) for t, d in drawn.items()):
            kept.append((group, subgroup, emoji))
            for task, d in drawn.items():
                drawings[task][emoji] = d
    return kept, drawings


def emoji_split() -> dict[str, str]:
    """Emoji -> split: each group's emoji shuffled (seeded) and cut 60/20/20, both tasks alike."""
    kept, _ = usable_emoji()
    split_of = {}
    for g, group in enumerate(EMOJI_GROUPS):
        split_of.update(cut_units(sorted(e for grp, _, e in kept if grp == group), SPLIT_FRACTIONS, [SEED, 32, 3, g]))
    return split_of


def place(
    drawing: np.ndarray,
    rng: np.random.Generator,
    size: int = IMAGE_SIZE,
    box: tuple[float, float] = BOX,
    max_rotation: float = MAX_ROTATION,
    background: int = 0,
) -> np.ndarray:
    """One `size`-square image: the drawing (RGBA, composited by its alpha, or an L mask) scaled so its longer side
    is a seeded length in `box`, rotated and shifted (up to MAX_SHIFT) by `rng`, on a `background` grey level."""
    length = rng.uniform(*box)
    angle = rng.uniform(-max_rotation, max_rotation)
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2)
    height, width = drawing.shape[:2]
    scale = length / max(height, width)
    img = Image.fromarray(drawing).resize(
        (max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.LANCZOS
    )
    if angle:
        img = img.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    w, h = img.size
    left = int(np.clip(round((size - w) / 2 + shift[0]), min(0, size - w), max(0, size - w)))
    top = int(np.clip(round((size - h) / 2 + shift[1]), min(0, size - h), max(0, size - h)))
    if drawing.ndim == 3:  # RGBA: composite by its alpha
        canvas = Image.new("RGB", (size, size), (background,) * 3)
        canvas.paste(img.convert("RGB"), (left, top), img.split()[3])
    else:
        canvas = Image.new("L", (size, size), background)
        canvas.paste(img, (left, top))
    return np.asarray(canvas, dtype=np.uint8)


def _build(task: str) -> Splits:
    kept, drawings = usable_emoji()
    split_of = emoji_split()
    out = {}
    for s, split in enumerate(SPLITS):
        images, labels = [], []
        for g, group in enumerate(EMOJI_GROUPS):
            members = [e for grp, _, e in kept if grp == group and split_of[e] == split]
            if not members:
                raise DataSourceError(f"{task}: no emoji of group {group!r} in the {split} split; check the pins")
            for emoji, k in in_turn(members, EMOJI_IMAGES[split]):
                rng = np.random.default_rng([SEED, 32, 4, zlib.crc32(f"{task}/{emoji}".encode()), k])
                images.append(place(drawings[task][emoji], rng))
                labels.append(g)
        order = np.random.default_rng([SEED, 32, 5, s, list(STYLE_FONT).index(task)]).permutation(len(labels))
        out[split] = (np.stack(images)[order], np.asarray(labels, np.int64)[order])
    return out


def build_emoji_color() -> Splits:
    return _build("emoji_color")


def build_emoji_mono() -> Splits:
    return _build("emoji_mono")


EMOJI_SOURCE = (
    "Debian packages "
    + ", ".join(f"{p}={v}" for p, v in sources.EMOJI_DEBS.items())
    + f", {sources.UNICODE_DATA_DEB[0]}={sources.UNICODE_DATA_DEB[1]} (emoji-test.txt)"
)
