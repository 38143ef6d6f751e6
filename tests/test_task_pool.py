"""The twenty-task pool (issue 32): its relations, and how each new family keeps designs out of two splits.

On the real data (the prepared tasks in the default cache, prepared on first use). Sizes, class balance, features
and exact-copy leakage of every task are checked in tests/test_tasks.py; here are the pool's own rules.
"""

import collections
import itertools
import os

import datasets
import numpy as np
import pytest

from mlvision import sources, tasks
from mlvision.errors import DataSourceError
from mlvision.tasks import cache, emoji, icons, speech, unicode_fonts

pytestmark = pytest.mark.slow  # the pool's tasks are prepared on first use (minutes); later runs read the cache


def _stored_bytes(name: str, split: str) -> list[bytes]:
    ds = tasks.load_task(name)[split].cast_column("image", datasets.Image(decode=False))
    return [item["bytes"] for item in ds["image"]]


def test_pool_is_twenty_tasks_with_every_designed_relation():
    pool = tasks.POOL_TASKS
    assert len(pool) == len(set(pool)) == 20
    assert pool[:6] == tasks.STUDY_TASKS  # the default study's six, first and unchanged
    assert not {"lfw_faces", "textures"} & set(pool)  # at the ceiling / one photo a class: not for claims
    pairs = list(itertools.combinations(pool, 2))
    kinds = collections.Counter(tasks.relation_kind(a, b) for a, b in pairs)
    assert kinds == {"unrelated": 145, "same_style": 26, "same_labels": 14, "same_images": 5}, kinds
    assert all(kinds[k] >= 5 for k in tasks.RELATION_KINDS)  # the floor: 5 pairs of each related kind
    assert tasks.relations("spoken_digit", "spoken_language") == {"same_images", "same_style"}
    assert tasks.relations("mnist", "spoken_digit") == {"same_labels"}
    assert tasks.relations("greek_letters", "cyrillic_letters") == {"same_style"}
    assert tasks.relations("mnist", "animals") == frozenset()
    # `related` (the six-task study's claim 2) is any designed relation
    assert all(tasks.related(a, b) == bool(tasks.relations(a, b)) for a, b in pairs)
    from mlvision.config import PROFILES

    assert PROFILES["wide"].tasks == pool and PROFILES["wide"].max_k == 20
    assert PROFILES["default"].tasks == tasks.STUDY_TASKS


@pytest.mark.parametrize(
    "a, b", [("spoken_digit", "spoken_language"), ("spoken_digit", "spoken_rate"), ("script_digits", "digit_script")]
)
def test_tasks_of_one_image_set_hold_the_very_same_images(a, b):
    assert tasks.get_task(a).image_set == tasks.get_task(b).image_set != ""
    for split in tasks.SPLITS:
        assert _stored_bytes(a, split) == _stored_bytes(b, split), split


def test_icon_tasks_hold_the_same_images_cut_two_ways():
    """icon_context and icon_theme: one pool of images, split by theme for one and by icon name for the other."""
    pool_context = sorted(b for s in tasks.SPLITS for b in _stored_bytes("icon_context", s))
    pool_theme = sorted(b for s in tasks.SPLITS for b in _stored_bytes("icon_theme", s))
    assert pool_context == pool_theme
    images, meta = icons.icon_pool()
    assert len(images) == len(meta) == len(icons.THEMES) * len(icons.CONTEXTS) * icons.CELL_IMAGES
    # icon_theme: no (theme, context, name) picture in two splits
    splits_of = collections.defaultdict(set)
    for theme, context, name, split in meta:
        splits_of[(theme, context, name)].add(split)
    assert all(len(s) == 1 for s in splits_of.values())
    # icon_context: no theme in two splits (4 / 1 / 2 themes)
    assert collections.Counter(icons.theme_split().values()) == dict(zip(tasks.SPLITS, icons.THEME_SPLIT))
    for split in tasks.SPLITS:  # and icon_context's splits hold the themes theme_split gives them, only those
        stored = set(_stored_bytes("icon_context", split))
        theirs = {i for i, (theme, *_) in enumerate(meta) if icons.theme_split()[theme] == split}
        assert stored == {cache._png(images[i]) for i in theirs}


def test_unicode_glyph_designs_never_straddle_splits():
    split_of = unicode_fonts.design_split()
    glyphs = unicode_fonts.unicode_glyphs()
    for set_name in unicode_fonts.CHARACTER_SETS:
        by_split = unicode_fonts.fonts_for(set_name)
        designs = {s: {glyphs[k][0] for k in keys} for s, keys in by_split.items()}
        for s in tasks.SPLITS:
            assert designs[s], (set_name, s)  # every script in every split
            assert all(split_of[d] == s for d in designs[s])
        for a, b in itertools.combinations(tasks.SPLITS, 2):
            assert not designs[a] & designs[b], (set_name, a, b)
        per_design = collections.Counter(glyphs[k][0] for keys in by_split.values() for k in keys)
        assert max(per_design.values()) <= unicode_fonts.MAX_FONTS_PER_DESIGN
    # clones in other packages share their original's design, so they share its split
    assert unicode_fonts.design_of("TeX Gyre Termes") == unicode_fonts.design_of("Nimbus Roman") == "nimbus"
    assert unicode_fonts.design_of("Hack") == unicode_fonts.design_of("DejaVu Sans Mono") == "dejavu"
    assert unicode_fonts.design_of("Noto Serif Bengali") == unicode_fonts.design_of("Open Sans") == "noto"


def test_each_emoji_is_in_one_split_and_both_styles_draw_the_same_emoji():
    kept, drawings = emoji.usable_emoji()
    assert set(drawings["emoji_color"]) == set(drawings["emoji_mono"]) == {e for *_, e in kept}
    assert {g for g, *_ in kept} == set(emoji.EMOJI_GROUPS)
    split_of = emoji.emoji_split()
    assert set(split_of) == {e for *_, e in kept}  # one split for each emoji, in both tasks
    for group in emoji.EMOJI_GROUPS:  # every group in every split, about 60 / 20 / 20 of its emoji
        counts = collections.Counter(split_of[e] for g, _, e in kept if g == group)
        assert set(counts) == set(tasks.SPLITS) and counts["train"] > counts["test"], (group, counts)
    # the stored images: an emoji's renders are only in its own split (checked on the colour task's test split)
    stored = {split: set(_stored_bytes("emoji_color", split)) for split in tasks.SPLITS}
    assert not stored["train"] & stored["test"] and not stored["validation"] & stored["test"]
    color, mono = tasks.load_task("emoji_color")["test"][0]["image"], tasks.load_task("emoji_mono")["test"][0]["image"]
    assert color.mode == "RGB" and mono.mode == "L" and color.size == mono.size == (emoji.IMAGE_SIZE,) * 2


def test_spoken_digits_are_the_same_on_a_new_synthesis():
    """A sample of the stored spoken digits synthesised again gives the very same pixels (espeak-ng is run from the
    pinned .debs at a seeded speed and pitch), and its three labels are the utterance's digit, language and rate."""
    items, labels = speech.digit_items()
    order = speech.split_order(items)
    root = speech.espeak_root()
    for split in tasks.SPLITS:
        stored = tasks.load_task("spoken_digit")[split]
        for position in (0, len(stored) // 2):
            item = items[order[split][position]]
            assert item[0] == split
            image = speech.log_mel_image(speech.synthesise(root, item[1], item[2], *speech.prosody(item[3])))
            assert np.array_equal(np.asarray(stored[position]["image"]), image), (split, item)
            assert stored[position]["label"] == labels["digit"][order[split][position]] == int(item[2])
            for task, key in (("spoken_language", "language"), ("spoken_rate", "rate")):
                assert tasks.load_task(task)[split][position]["label"] == labels[key][order[split][position]]
    # no voice variant in two splits
    voices = {s: {items[i][1].split("+")[1] for i in idx} for s, idx in order.items()}
    assert all(not voices[a] & voices[b] for a, b in itertools.combinations(tasks.SPLITS, 2))
    assert [len(voices[s]) for s in tasks.SPLITS] == [61, 20, 20]
    assert speech.rate_of(120) == 0 and speech.rate_of(146) == 0 and speech.rate_of(147) == 1
    assert speech.rate_of(174) == 2 and speech.rate_of(200) == 2


def test_log_mel_image_puts_a_tone_at_its_frequency():
    """The hand-written mel spectrogram: a pure 1 kHz tone lights one band, at the height of 1 kHz on the mel scale."""
    t = np.arange(speech.SAMPLE_RATE // 2) / speech.SAMPLE_RATE
    image = speech.log_mel_image(0.5 * np.sin(2 * np.pi * 1000 * t).astype(np.float32))
    assert image.shape == (speech.IMAGE_SIZE, speech.IMAGE_SIZE) and image.dtype == np.uint8
    row = int(np.argmax(image[:, speech.IMAGE_SIZE // 2]))  # the middle column: inside the centred tone
    mel = 2595 * np.log10(1 + np.array([1000.0, speech.SAMPLE_RATE / 2]) / 700)
    expected = speech.IMAGE_SIZE - 1 - mel[0] / mel[1] * (speech.IMAGE_SIZE - 1)  # low frequencies at the bottom
    assert abs(row - expected) <= 2, (row, expected)
    assert image[:, 2].max() < 40  # silence before the centred half-second tone


def test_a_task_that_cannot_be_prepared_says_which_and_why(tmp_path, monkeypatch):
    """A package that cannot be fetched: one line naming the task, the package and the fix; nothing cached."""
    monkeypatch.setenv("MLV_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # no apt-get: the .debs cannot be fetched
    with pytest.raises(DataSourceError) as info:
        tasks.load_task("emoji_mono")
    message = str(info.value)
    assert message.startswith("task 'emoji_mono' could not be prepared: ")
    assert "apt-get is not available" in message and "fonts-noto-color-emoji" in message and "\n" not in message
    assert not tasks.task_cache_path("emoji_mono").exists()


def test_espeak_is_refused_on_another_architecture(monkeypatch):
    monkeypatch.setattr(speech.platform, "machine", lambda: "aarch64")
    with pytest.raises(DataSourceError, match="amd64 build of espeak-ng, and this machine is aarch64"):
        speech.espeak_root()


def test_a_voice_that_says_nothing_is_an_error_naming_it():
    root = speech.espeak_root()
    with pytest.raises(DataSourceError, match="espeak-ng failed on voice 'xx-no-such-voice'"):
        speech.synthesise(root, "xx-no-such-voice", "1", 150, 50)
    assert os.path.exists(root / "usr" / "bin" / "espeak-ng")
    assert sources.ESPEAK_DEBS["espeak-ng"] in str(root)


def test_pool_report_prints_a_row_per_task_with_licences_and_leakage(capsys):
    """scripts/task_pool_report.py, as the closing note of issue 32 used it: licences read from the packages'
    copyright files, split sizes, what a split is cut by, exact and near duplicates."""
    import importlib.util

    from mlvision.paths import REPO_ROOT

    spec = importlib.util.spec_from_file_location("task_pool_report", REPO_ROOT / "scripts" / "task_pool_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    report.main(["--tasks", "uci_digits", "emoji_mono", "spoken_word"])
    rows = {line.split(" | ")[0].strip("| "): line for line in capsys.readouterr().out.splitlines() if " | " in line}
    assert set(rows) >= {"uci_digits", "emoji_mono", "spoken_word"}
    assert "free text (see its copyright file)" in rows["emoji_mono"] and "Apache-2.0" in rows["emoji_mono"]
    assert "GPL-3+" in rows["spoken_word"] and "| voice variant | 0 |" in rows["spoken_word"]
    assert "| 1,078 / 360 / 359 |" in rows["uci_digits"] and "| 0 | 0 / 0 |" in rows["uci_digits"]
    assert rows["uci_digits"].endswith("| - | - |")  # no pilot database given: no accuracy, never a made-up one
