"""The bench stage: measures every requested section not yet stored for this machine, and stores it.

A figure is identified by its setting and the machine (CPU model, cores, threads, torch, device);
a setting already measured on this machine is skipped (`--again` measures and replaces it). Each
section's figures go into the `benchmark_rows` table (the `benchmarks` view) in one transaction.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.options import BenchConfig, resolve_device
from benchmarks.sections import SECTIONS
from benchmarks.timing import machine_description
from mlvision.config import StudyConfig
from mlvision.runs import stored_model_folder, study_run_id
from mlvision.store import Store, config_hash, insert_row, now


class BenchStage:
    def __init__(self, config: StudyConfig, store: Store, bench: BenchConfig):
        self.config = config
        self.store = store
        self.bench = bench
        self.device = resolve_device(bench.device)
        self.machine = machine_description(self.device)
        self.run_id = study_run_id(config)
        self.tasks = list(config.tasks)[: bench.max_k or config.max_k]
        self.seed = config.seeds[0]
        # the backbone as benchmarked: the study's, possibly at another image size
        self.backbone_config = replace(config.backbone_config, image_size=bench.image_size or config.image_size)

    def model_folder(self, kind: str, task: str) -> Path:
        return stored_model_folder(self.store, self.config, kind, task, self.seed)

    # -- identity and storage ---------------------------------------------------------------------
    def setting(self, section: str) -> dict:
        """What a section's figures depend on (besides variant, k and batch size)."""
        common = {
            "section": section,
            "machine": self.machine,
            "backbone": self.backbone_config.to_dict(),
            "tasks": self.tasks,
            "seed": self.seed,
        }
        return {**common, **SECTIONS[section].setting(self)}

    def bench_id(self, section: str, variant: str, k: int | None, batch_size: int | None) -> str:
        return "bench-" + config_hash({**self.setting(section), "variant": variant, "k": k, "batch_size": batch_size})

    def planned(self, section: str) -> list[tuple[str, int | None, int | None]]:
        """Every (variant, k, batch size) a section measures."""
        return SECTIONS[section].plan(self)

    def already_stored(self, section: str) -> bool:
        if self.bench.again or not self.store.path.exists():
            return False
        wanted = {self.bench_id(section, *item) for item in self.planned(section)}
        stored = {row[0] for row in self.store.query("SELECT bench_id FROM benchmark_rows WHERE name = ?", [section])}
        return wanted <= stored

    def save(self, section: str, rows: list[dict], repeats: int) -> None:
        """One transaction per section; a figure measured again replaces the old one (same bench_id)."""
        measured_at = now()
        with self.store.write() as con:
            for row in rows:
                bench_id = self.bench_id(section, row["variant"], row["k"], row["batch_size"])
                con.execute("DELETE FROM benchmark_rows WHERE bench_id = ?", [bench_id])
                record = {
                    "name": section,
                    "device": self.device.type,
                    "machine": self.machine,
                    "measured_at": measured_at,
                    "bench_id": bench_id,
                    "backbone": self.config.backbone,
                    "image_size": self.backbone_config.image_size,
                    "threads": torch.get_num_threads(),
                    "repeats": repeats,
                    "run_id": self.run_id,
                    "ratio_to_backbone": None,
                    "throughput": None,
                    "peak_memory_mb": None,
                    "note": None,
                    **row,
                }
                insert_row(con, "benchmark_rows", record, key=("bench_id",))

    def run(self) -> dict:
        """Measure each requested section not yet stored for this machine; returns counts."""
        counts = {"measured": 0, "skipped": 0}
        for name in self.bench.sections:
            section = SECTIONS[name]
            if not section.applies(self):
                continue
            if self.already_stored(name):
                counts["skipped"] += 1
                continue
            self.save(name, section.measure(self), section.repeats(self))
            counts["measured"] += 1
        return counts


def summary(store: Store, run_id: str, device: str, image_size: int) -> str:
    """The headline figures of the stored benchmarks of this study on `device` at `image_size`, as printable lines."""
    lines = []
    where = "run_id = ? AND device = ? AND image_size = ?"
    params = [run_id, device, image_size]
    rows = store.query(
        f"""SELECT batch_size, variant, k, median_ms, ratio_to_backbone FROM benchmarks
                           WHERE name = 'inference' AND {where} AND k = (
                               SELECT max(k) FROM benchmarks WHERE name = 'inference' AND {where})
                           ORDER BY batch_size, variant""",
        params + params,
    )
    for batch_size in sorted({r[0] for r in rows}):
        parts = [
            f"{variant} {median:.1f} ms ({ratio:.2f}x)" for b, variant, k, median, ratio in rows if b == batch_size
        ]
        lines.append(f"inference, {image_size} px, batch {batch_size}, k={rows[0][2]}: " + ", ".join(parts))
    for throughput, speedup in store.query(
        f"SELECT throughput, ratio_to_backbone FROM benchmarks WHERE name = 'evaluation' AND variant = 'fast' "
        f"AND {where}",
        params,
    ):
        lines.append(f"evaluation, {image_size} px: fast path {throughput:.0f} images/s, {speedup:.2f}x eager")
    for variant, throughput, memory in store.query(
        f"SELECT variant, throughput, peak_memory_mb FROM benchmarks WHERE name = 'training' AND {where} "
        "ORDER BY variant",
        params,
    ):
        lines.append(f"training {variant}, {image_size} px: {throughput:.0f} images/s, peak +{memory:.0f} MB")
    return "\n".join(lines)
