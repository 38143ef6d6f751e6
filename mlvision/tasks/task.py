"""What a task is (`Task`), the one shape its data take (`features_for`), and label names tasks share.

Why a module of its own and not in registry.py: both the registry of built-in tasks (registry.py) and
hub datasets (hub.py) make `Task`s, and the registry looks hub tasks up (registry imports hub), so the
class sits below both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import datasets


@dataclass(frozen=True)
class Task:
    """What a task is: its name, its classes, and where its data comes from."""

    name: str  # registry name, e.g. "mnist", or "hub:<id>"
    label_names: tuple[str, ...]
    domain: str  # "digits" | "objects" | "photos" | "hub" (or set_hub_domains)
    source: str  # human-readable origin of the data
    description: str  # one line
    # built-in tasks only: the function that builds the splits from registry files, and the split
    # sizes (train, validation, test) it yields (tests/test_tasks.py checks them on the real data)
    builder: Callable[[], dict] | None = field(default=None, compare=False, repr=False)
    sizes: tuple[int, int, int] | None = None
    # What makes two tasks related by construction (study v2, claim 2): the same label space in another
    # style (MNIST and printed digits), or the same style with other labels (printed digits and letters).
    # "" = unknown (hub tasks): such a task is related to nothing.
    label_space: str = ""
    style: str = ""
    # The pool of images the task labels (issue 32): two tasks of one image_set label the very same images in two
    # ways (a spoken digit's value and its language; a printed digit's value and its script). "" = its own images.
    image_set: str = ""
    # What a split is cut by, so that no design is in two splits (issue 32's leakage rule): "font design", "voice
    # variant"... or, for the sources that fix their own split, what that split does and does not keep apart.
    split_by: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


def features_for(task: Task) -> datasets.Features:
    """The exact features every task's splits carry."""
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(task.label_names))})


# Label names several tasks share (mnist, uci_digits, font_digits, spoken_digit, script_digits; font_letters;
# font_lower).
DIGITS = tuple(str(i) for i in range(10))
LETTERS = tuple(chr(c) for c in range(ord("A"), ord("Z") + 1))
LOWER_LETTERS = tuple(chr(c) for c in range(ord("a"), ord("z") + 1))
