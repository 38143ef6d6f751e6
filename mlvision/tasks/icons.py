"""The icon tasks (issue 32): desktop icons from seven Debian icon themes, labelled two ways.

- icon_context: what the icon is for, the theme folder it lies in (actions, apps, devices, mimetypes, status);
  split by theme, so a model is tested on themes it never saw;
- icon_theme: the very same images labelled by theme (7); split by icon name (document-open, battery-low...), so a
  model is tested on things it never saw drawn in any theme (the "same images, other labelling" relation).

Images: the 32x32 PNGs (regular files; a theme's symlinked aliases are the same pictures) of the seven themes in
`sources.ICON_DEBS`, each drawn at a seeded size (26-32 px) and shift on white, 32x32 RGB. Every (theme, context)
gets CELL_IMAGES images, its icons drawn in turn, so that both labellings are balanced whatever a theme holds
(Faenza has 293 app icons, nuoveXT2 10 status icons). Left out: the "places" context (2-31 icons a theme) and
Moka (apps only: 4-17 icons in other contexts).
"""

from __future__ import annotations

import io
import itertools
import re
import zlib

import numpy as np
from PIL import Image

from .. import sources
from ..errors import DataSourceError
from .emoji import place
from .splits import SEED, SPLITS, Splits, cut_units, in_turn, pixel_hash

CONTEXTS = ("actions", "apps", "devices", "mimetypes", "status")
CONTEXT_ALIASES = {"mimes": "mimetypes"}  # elementary-xfce's folder name
# Debian package -> the theme folder (under usr/share/icons/) its icons are taken from (variants left out).
THEME_FOLDERS = {
    "elementary-xfce-icon-theme": "elementary-xfce",
    "faenza-icon-theme": "Faenza",
    "gnome-colors-common": "gnome-colors-common",
    "gnome-icon-theme": "gnome",
    "lxde-icon-theme": "nuoveXT2",
    "mate-icon-theme": "mate",
    "tango-icon-theme": "Tango",
}
THEMES = tuple(THEME_FOLDERS.values())
ICON_SIZE = 32
BOX = (26, 32)  # the icon's longer side after a seeded rescale, pixels (no rotation: icons stand upright)
CELL_IMAGES = 60  # images per (theme, context): its icons drawn in turn, a new seeded placement each round
THEME_SPLIT = (4, 1, 2)  # themes in train / validation / test for icon_context (7 themes: 60/20/20 gives 4/2/1)
NAME_FRACTIONS = (0.6, 0.2, 0.2)  # of each (theme, context)'s icon names, for icon_theme
_SIZE_PART = re.compile(rf"^{ICON_SIZE}(x{ICON_SIZE})?$")


def _theme_icons(package: str, version: str) -> dict[tuple[str, str], bytes]:
    """(context, icon name) -> PNG bytes of a theme's 32x32 icons in CONTEXTS, whichever folder layout it uses
    (<size>/<context>/ or <context>/<size>/)."""
    folder = f"usr/share/icons/{THEME_FOLDERS[package]}/"
    out = {}
    for path, data in sources.read_deb_folder(sources.fetch_deb(package, version), folder, ".png").items():
        parts = path[len(folder) :].split("/")
        if len(parts) == 3 and any(_SIZE_PART.match(p) for p in parts[:2]):
            context = next(
                (CONTEXT_ALIASES.get(p, p) for p in parts[:2] if CONTEXT_ALIASES.get(p, p) in CONTEXTS), None
            )
            if context:
                out[(context, parts[2][: -len(".png")])] = data
    return out


def _rgba(png: bytes) -> np.ndarray | None:
    """A 32x32 icon as RGBA cropped to its visible part, or None when it is not a 32x32 picture."""
    try:
        with Image.open(io.BytesIO(png)) as img:
            img = img.convert("RGBA")
    except (OSError, ValueError):
        return None
    a = np.asarray(img)
    if img.size != (ICON_SIZE, ICON_SIZE) or a[..., 3].max() < 128:
        return None
    rows, cols = np.flatnonzero(a[..., 3].max(1) >= 128), np.flatnonzero(a[..., 3].max(0) >= 128)
    return a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


@sources.per_downloads_folder
def icon_drawings() -> dict[tuple[str, str], dict[str, np.ndarray]]:
    """(theme, context) -> {icon name: RGBA drawing}, one copy of each picture seen in one theme only.

    Themes copy icons from each other: a picture drawn alike in two themes has no theme, and copies within a theme
    would be one design under two names. Both are left out (by exact pixels of the 32x32 PNG).
    """
    found = []
    for package, version in sources.ICON_DEBS.items():
        for (context, name), png in sorted(_theme_icons(package, version).items()):
            drawing = _rgba(png)
            if drawing is not None:
                found.append((THEME_FOLDERS[package], context, name, drawing))
    hashes = [pixel_hash(d) for *_, d in found]
    themes_of: dict[bytes, set[str]] = {}
    for h, (theme, *_) in zip(hashes, found):
        themes_of.setdefault(h, set()).add(theme)
    first = {h: i for i, h in reversed(list(enumerate(hashes)))}
    out: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for i, (theme, context, name, drawing) in enumerate(found):
        if first[hashes[i]] == i and len(themes_of[hashes[i]]) == 1:
            out.setdefault((theme, context), {})[name] = drawing
    missing = [cell for cell in itertools.product(THEMES, CONTEXTS) if len(out.get(cell, {})) < 5]
    if missing:
        raise DataSourceError(
            f"icon tasks: fewer than 5 usable 32x32 icons for (theme, context) {missing}: the icon theme packages "
            "changed; check sources.ICON_DEBS"
        )
    return out


def theme_split() -> dict[str, str]:
    """Theme -> split for icon_context: THEME_SPLIT themes in train / validation / test, a seeded draw."""
    return cut_units(list(THEMES), np.divide(THEME_SPLIT, sum(THEME_SPLIT)), [SEED, 32, 7])


@sources.per_downloads_folder
def icon_pool() -> tuple[np.ndarray, list[tuple[str, str, str, str]]]:
    """The images, CELL_IMAGES per (theme, context), and (theme, context, icon name, icon_theme split) of each.

    A cell's icon names are cut 60/20/20 (seeded) for icon_theme, and each split part gets its share of the
    cell's images, its icons drawn in turn: every theme has the same number of images in every split.
    """
    images, meta = [], []
    for t, c in itertools.product(range(len(THEMES)), range(len(CONTEXTS))):
        theme, context = THEMES[t], CONTEXTS[c]
        drawings = icon_drawings()[(theme, context)]
        names = sorted(drawings)
        split_of = cut_units(names, NAME_FRACTIONS, [SEED, 32, 100 + 10 * t + c])
        shares = np.diff(np.round(np.cumsum((0,) + NAME_FRACTIONS) * CELL_IMAGES)).astype(int)
        for split, share in zip(SPLITS, shares):
            members = [name for name in names if split_of[name] == split]
            for name, k in in_turn(members, share):
                rng = np.random.default_rng([SEED, 32, 6, zlib.crc32(f"{theme}/{context}/{name}".encode()), k])
                images.append(place(drawings[name], rng, ICON_SIZE, BOX, 0.0, 255))
                meta.append((theme, context, name, split))
    return np.stack(images), meta


def _build(label: str) -> Splits:
    images, meta = icon_pool()
    if label == "context":  # icon_context: split by theme
        split_of = theme_split()
        split = np.array([split_of[theme] for theme, *_ in meta])
        labels = np.array([CONTEXTS.index(context) for _, context, _, _ in meta], np.int64)
    else:  # icon_theme: split by icon name within each (theme, context)
        split = np.array([s for *_, s in meta])
        labels = np.array([THEMES.index(theme) for theme, *_ in meta], np.int64)
    out = {}
    for s, name in enumerate(SPLITS):
        idx = np.flatnonzero(split == name)
        idx = idx[np.random.default_rng([SEED, 32, 9, s, len(label)]).permutation(len(idx))]
        out[name] = (images[idx], labels[idx])
    return out


def build_icon_context() -> Splits:
    return _build("context")


def build_icon_theme() -> Splits:
    return _build("theme")


ICON_SOURCE = "Debian packages " + ", ".join(f"{p}={v}" for p, v in sources.ICON_DEBS.items()) + " (32x32 PNG icons)"
