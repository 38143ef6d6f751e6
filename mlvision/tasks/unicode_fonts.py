"""The Unicode glyph tasks (issue 32): Greek and Cyrillic small letters, and the digits of four other scripts.

- greek_letters: α-ω (24 classes; final sigma left out, it is σ's other form);
- cyrillic_letters: а-я (32 classes; ё left out, it is е with a diaeresis);
- script_digits: the digits 0-9 of the Arabic-Indic, Devanagari, Bengali and Malayalam scripts, labelled by value
  (the same label space as mnist, in scripts none of the other digit tasks draw);
- digit_script: the very same images, labelled by script (the "same images, other labelling" relation).

The fonts come from the Debian packages pinned in `sources.UNICODE_FONT_DEBS` (52 packages: text faces and the
script foundries' faces), read in memory from the .debs, rasterised once and drawn as the font tasks draw theirs
(fonts.py: 28x28 white on black, seeded size, rotation and shift). A font is used for a character set only if it
passes the font tasks' rule (`fonts._renders_every_class`: inked, not the .notdef box, no two classes alike).

Split by design, not by file: `design_of` maps a font's family name to its design (the first word of the name, so
"Noto Sans Bengali" and "Noto Serif Bengali" are one design "noto"; known clones and derivatives across packages,
TeX Gyre Termes of Nimbus Roman, Hack of DejaVu, Noto Sans of Open Sans, to their original). Designs are cut
60/20/20 once for all four tasks (`design_split`), stratified by the scarcest character set each design draws, so
that every script has designs in every split and no design is in two splits, whatever the task.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import ImageFont

from .. import sources
from ..errors import DataSourceError
from . import fonts
from .splits import SEED, SPLITS, Splits, cut_units, in_turn

GREEK_LOWER = tuple(chr(c) for c in range(0x3B1, 0x3CA) if c != 0x3C2)  # α..ω without ς
CYRILLIC_LOWER = tuple(chr(c) for c in range(0x430, 0x450))  # а..я
# Each script's digits 0-9 (Unicode puts them in order, zero first).
SCRIPT_DIGITS = {
    "arabic_indic": tuple(chr(0x660 + i) for i in range(10)),
    "devanagari": tuple(chr(0x966 + i) for i in range(10)),
    "bengali": tuple(chr(0x9E6 + i) for i in range(10)),
    "malayalam": tuple(chr(0xD66 + i) for i in range(10)),
}
# The character sets a font is checked for; a design's stratum in `design_split` is the scarcest set it draws.
CHARACTER_SETS = {"greek": GREEK_LOWER, "cyrillic": CYRILLIC_LOWER, **SCRIPT_DIGITS}
# Family names whose design comes from another family's, in another package: they must share a split.
DESIGN_ALIASES = {
    "tex gyre termes": "nimbus",  # TeX Gyre fonts extend the URW base-35 clones
    "tex gyre heros": "nimbus",
    "tex gyre heros cn": "nimbus",
    "tex gyre cursor": "nimbus",
    "tex gyre pagella": "p052",
    "tex gyre schola": "c059",
    "tex gyre bonum": "urw",
    "tex gyre adventor": "urw",
    "tex gyre chorus": "z003",
    "dejavu math tex gyre": "dejavu",  # DejaVu's math face
    "hack": "dejavu",  # Hack derives from DejaVu Sans Mono
    "open sans": "noto",  # Noto Sans derives from Open Sans
    "open sans condensed": "noto",
    "stixgeneral": "stix",
    "mry_kacstqurn": "kacstqurn",
}
# Renders per (font, class) in each split. A design's fonts beyond MAX_FONTS_PER_DESIGN (weights and widths of one
# face: Noto has 58 here, CMU 33) are left out, a seeded choice, so that no design fills a split.
GLYPH_IMAGES = {"train": 2, "validation": 1, "test": 1}
MAX_FONTS_PER_DESIGN = 6
# script_digits / digit_script: images per (script, digit) in each split, balanced over scripts whatever their
# number of fonts (each script's fonts are cycled, a new seeded render each round).
SCRIPT_IMAGES = {"train": 60, "validation": 20, "test": 20}
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # of the designs in each stratum
UNICODE_TASKS = ("greek_letters", "cyrillic_letters", "script_digits", "digit_script")


def design_of(family: str) -> str:
    """A font family's design: its alias (`DESIGN_ALIASES`) or the first word of its name, lower case."""
    name = " ".join(family.lower().split())
    if name in DESIGN_ALIASES:
        return DESIGN_ALIASES[name]
    first = name.split()[0] if name else ""
    return DESIGN_ALIASES.get(first, first)


def _unicode_fonts() -> dict[str, bytes]:
    """'package/file.ttf' -> font bytes, every .ttf and .otf of the pinned packages, read in memory."""
    out = {}
    for package, version in sources.UNICODE_FONT_DEBS.items():
        deb = sources.fetch_deb(package, version)
        for path, data in sources.read_deb_folder(deb, "usr/share/", (".ttf", ".otf")).items():
            out[f"{package}/{path.rsplit('/', 1)[-1]}"] = data
    return out


@sources.per_downloads_folder
def unicode_glyphs() -> dict[str, tuple[str, dict[str, dict[str, np.ndarray]]]]:
    """Font key -> (design, {character set: {char: glyph mask}}) for the sets the font draws (`CHARACTER_SETS`)."""
    out = {}
    for key, data in sorted(_unicode_fonts().items()):
        try:
            font = ImageFont.truetype(io.BytesIO(data), fonts.FONT_RENDER_SIZE)
            notdef = fonts._glyph_mask(font, fonts._NOTDEF_PROBE)
            drawn = {}
            for set_name, chars in CHARACTER_SETS.items():
                glyphs = {c: fonts._glyph_mask(font, c) for c in chars}
                if fonts._renders_every_class({**glyphs, fonts._NOTDEF_PROBE: notdef}, chars):
                    drawn[set_name] = glyphs
        except OSError:  # not a font FreeType can read, or one it cannot draw: unusable
            continue
        if drawn:
            out[key] = (design_of(font.getname()[0] or ""), drawn)
    return out


def design_split() -> dict[str, str]:
    """Design -> split, one cut for the four tasks: designs grouped by the scarcest character set they draw,
    each group shuffled (seeded) and cut 60/20/20, so every set has designs in every split."""
    glyphs = unicode_glyphs()
    designs: dict[str, set[str]] = {}
    for design, drawn in glyphs.values():
        designs.setdefault(design, set()).update(drawn)
    count = {s: sum(s in sets for sets in designs.values()) for s in CHARACTER_SETS}
    strata: dict[str, list[str]] = {}
    for design, sets in sorted(designs.items()):
        strata.setdefault(min(sets, key=lambda s: (count[s], s)), []).append(design)
    split_of = {}
    for i, (stratum, members) in enumerate(sorted(strata.items())):
        split_of.update(cut_units(members, SPLIT_FRACTIONS, [SEED, 32, zlib.crc32(stratum.encode())]))
    return split_of


def fonts_for(set_name: str) -> dict[str, list[str]]:
    """{split: [font keys]} that draw `set_name`, by their design's split, at most MAX_FONTS_PER_DESIGN a design."""
    split_of = design_split()
    by_design: dict[str, list[str]] = {}
    for key, (design, drawn) in sorted(unicode_glyphs().items()):
        if set_name in drawn:
            by_design.setdefault(design, []).append(key)
    out: dict[str, list[str]] = {split: [] for split in SPLITS}
    for design, keys in by_design.items():
        if len(keys) > MAX_FONTS_PER_DESIGN:
            rng = np.random.default_rng([SEED, 32, zlib.crc32(f"{set_name}/{design}".encode())])
            keys = sorted(rng.choice(keys, MAX_FONTS_PER_DESIGN, replace=False).tolist())
        out[split_of[design]].extend(keys)
    return out


def _seed(task_id: int, font: str, cls: int, k: int) -> np.random.Generator:
    return np.random.default_rng([SEED, 32, task_id, zlib.crc32(font.encode()), cls, k])


def _build_letters(task: str, set_name: str) -> Splits:
    """Every font of each split (`fonts_for`), each class, GLYPH_IMAGES[split] renders each, shuffled (seeded)."""
    glyphs = unicode_glyphs()
    chars = CHARACTER_SETS[set_name]
    task_id = UNICODE_TASKS.index(task)
    out = {}
    for s, (split, keys) in enumerate(fonts_for(set_name).items()):
        images, labels = [], []
        for key in keys:
            for c, char in enumerate(chars):
                for k in range(GLYPH_IMAGES[split]):
                    images.append(fonts._render_glyph(glyphs[key][1][set_name][char], _seed(task_id, key, c, k)))
                    labels.append(c)
        order = np.random.default_rng([SEED, 32, 99, task_id, s]).permutation(len(labels))
        out[split] = (np.stack(images)[order], np.asarray(labels, dtype=np.int64)[order])
    return out


@sources.per_downloads_folder
def _script_digit_images() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """{split: (images, digit labels, script labels)}: SCRIPT_IMAGES[split] images per (script, digit), the
    script's fonts of that split taken in turn, render k of a font seeded by (font, script, digit, k).

    Built once per process and downloads folder: script_digits and digit_script are these very images."""
    glyphs = unicode_glyphs()
    out = {}
    for s, split in enumerate(SPLITS):
        images, digits, scripts = [], [], []
        for si, script in enumerate(SCRIPT_DIGITS):
            keys = fonts_for(script)[split]
            if not keys:
                raise DataSourceError(
                    f"script_digits: no font of the {split} split draws the {script} digits: the font packages "
                    "changed (sources.UNICODE_FONT_DEBS); pin versions that draw them"
                )
            for d, char in enumerate(SCRIPT_DIGITS[script]):
                for key, k in in_turn(keys, SCRIPT_IMAGES[split]):
                    images.append(fonts._render_glyph(glyphs[key][1][script][char], _seed(2, key, si * 10 + d, k)))
                    digits.append(d)
                    scripts.append(si)
        order = np.random.default_rng([SEED, 32, 98, s]).permutation(len(digits))
        out[split] = (np.stack(images)[order], np.asarray(digits)[order], np.asarray(scripts)[order])
    return out


def build_greek_letters() -> Splits:
    return _build_letters("greek_letters", "greek")


def build_cyrillic_letters() -> Splits:
    return _build_letters("cyrillic_letters", "cyrillic")


def build_script_digits() -> Splits:
    return {split: (images, digits.astype(np.int64)) for split, (images, digits, _) in _script_digit_images().items()}


def build_digit_script() -> Splits:
    return {split: (images, scripts.astype(np.int64)) for split, (images, _, scripts) in _script_digit_images().items()}


# Where the four tasks' fonts come from (one sentence, shared by their registry entries).
UNICODE_FONTS_SOURCE = f"{len(sources.UNICODE_FONT_DEBS)} Debian bookworm font packages (sources.UNICODE_FONT_DEBS)"
