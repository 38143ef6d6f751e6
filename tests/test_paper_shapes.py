"""benchmarks/paper_shapes.py, the device check's cost of paper-scale shapes, run end to end on a small ViT."""

from __future__ import annotations

import re

import pytest

from benchmarks.paper_shapes import main


@pytest.mark.slow
def test_paper_shapes_prints_every_figure_with_its_memory(capsys):
    """Every hot path runs and prints a positive figure and its peak memory; the header says the weights are random
    (cost only). The paper's ViT-B/16 is the GPU's (scripts/device_check.sh vit-b16); here a ViT-Tiny at 32 px."""
    argv = [
        "--backbone",
        "vit_tiny_patch16_224",
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--train-batch",
        "2",
        "--steps",
        "1",
    ]
    argv += ["--images", "4", "--gram-images", "4", "--k", "2", "--rank", "2", "--demo-batch", "2", "--repeats", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "random weights: cost only, no accuracy" in out
    for what in ("training step, batch 2", "Gram matrices, one adapter", "RegMean merge, k = 2", "sweep scoring",
                 "demo answer, batch of 2"):  # fmt: skip
        line = next((line for line in out.splitlines() if line.startswith(what)), None)
        assert line is not None, f"{what!r} missing from:\n{out}"
        figure = float(re.search(r": ([\d,.]+) (s|ms)", line).group(1).replace(",", ""))
        assert figure > 0 and "peak memory" in line, line
