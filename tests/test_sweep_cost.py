"""benchmarks/sweep_cost.py: each method's measured cost per merge, projected over the study's plan."""

from __future__ import annotations

import re
from dataclasses import replace

from conftest import TINY_ARGS, tiny_config

from benchmarks.sweep_cost import main
from merging.sweep import sweep_plan


def test_sweep_cost_measures_every_method_and_projects_its_plan(tiny_study, capsys):
    """One line per method with a positive time at each k of the plan and its number of merges; the total is the
    sum of the lines (the figures are this machine's, so only their shape is checked)."""
    study_args = TINY_ARGS[: TINY_ARGS.index("--bench-sections")]  # the study's options, not the bench's
    methods = ["task_arithmetic", "ties"]  # two of the tiny study's methods: each timed merge costs seconds here
    argv = [*study_args, "--db", tiny_study["db"], "--artifacts", tiny_study["artifacts"], "--merge-methods", *methods]
    assert main(argv) == 0
    out = capsys.readouterr().out
    plan = sweep_plan(replace(tiny_config(tiny_study), merge_methods=tuple(methods)))
    ks = sorted({len(group) for group, _, _ in plan})
    projected = 0.0
    for method in methods:
        line = next((line for line in out.splitlines() if line.split(" ")[0] == method), None)
        assert line is not None, f"{method} missing from:\n{out}"
        *seconds, merges, minutes, unit = line.split()[1:]
        assert len(seconds) == len(ks) and all(float(s) > 0 for s in seconds), line
        assert int(merges) == sum(1 for _, _, m in plan if m == method) and unit == "min", line
        projected += float(minutes)
    total = float(re.search(r"about ([\d.]+) min on this machine", out).group(1))
    assert abs(total - projected) <= 0.05 * len(methods) + 0.1, out  # each line is rounded to 0.1 min
