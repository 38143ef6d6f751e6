"""The bench command: `python -m training.bench` (also `mlv-bench`), and run_all's bench stage.

    python -m training.bench                      # the default study's adapters, stored in results.duckdb
    python -m training.bench --device cuda        # the same on a GPU (clocks synchronised)
    python -m training.bench --bench-sections inference --bench-repeats 50 --again

Sections (benchmarks/sections/): inference (merged vs separate vs peft-switched adapters against
the plain backbone, interleaved), training (LoRA vs head-only vs full fine-tuning step: speed and
peak memory) and merge (time per method). Skip it in run_all with `--stages train merge findings`.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks.options import add_bench_arguments, bench_config_from_args, profile_bench
from benchmarks.stage import BenchStage, summary
from merging.methods import list_methods
from mlvision.config import add_study_arguments, config_from_args, help_defaults, help_profile, profile_name
from mlvision.errors import run_cli
from mlvision.store import Store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    given = sys.argv[1:] if argv is None else argv
    add_study_arguments(parser, help_defaults(given))  # --help shows the chosen profile's defaults, as run_all's
    add_bench_arguments(parser, profile_bench(help_profile(given)))
    args = parser.parse_args(argv)

    def bench() -> int:
        config = config_from_args(args, tuple(list_methods()))
        store = Store(config.db)
        store.initialise()
        stage = BenchStage(config, store, bench_config_from_args(args, profile_name(args)))
        counts = stage.run()
        print(
            f"benchmarks: {counts['measured']} sections measured, {counts['skipped']} already stored for this machine"
        )
        print(summary(store, stage.run_id, stage.device.type, stage.backbone_config.image_size))
        return 0

    return run_cli(bench, "sections finished so far are stored; run the same command again to continue")


if __name__ == "__main__":
    sys.exit(main())
