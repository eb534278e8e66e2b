"""benchmarks/gpu.py --smoke: every part of the GPU benchmark runs on CPU with tiny sizes and fills its table, so
the script that only a GPU machine runs for real cannot rot unnoticed. The numbers themselves mean nothing."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PRECISIONS = ("fp32", "bf16")
EXPECTED: list[tuple[str, ...]] = [  # the words each row's metric holds, one row each
    *(
        ("step time", model, f", {precision}:", f"{variant} / plain")
        for precision in PRECISIONS
        for model in ("mnist recipe CNN", "charlm recipe GPT")
        for variant in ("launcher", "Accelerate's wrappers")
    ),
    ("mnist-mini to 98% test accuracy: training time",),
    ("mnist-mini to 98%: whole command",),
    ("char-LM", "tokens/s, eager"),
    ("char-LM", "tokens/s, --compile / eager"),
    ("char-LM", "MFU, eager"),
    ("char-LM", "MFU, --compile"),
    ("char-LM", "peak memory (GB), --compile / eager"),
    ("checkpoint", "training blocked per save, async / sync"),
    ("checkpoint", "save until committed, async / sync"),
    *((f"wall time, part {part}",) for part in ("overhead", "mnist", "charlm", "checkpoint")),
    ("wall time, all parts",),
]


def parse(table: str) -> dict[str, list[str]]:
    """metric -> its other cells, from the markdown table (header and rule left out)."""
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {row[0]: row[1:] for row in rows}


@pytest.mark.slow
def test_smoke_run_fills_every_row(tmp_path: Path) -> None:
    out = tmp_path / "gpu.md"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--smoke", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    text = out.read_text()
    assert text.startswith("machine: ") and "no GPU" in text.splitlines()[0]
    assert text in done.stdout  # the same table on stdout
    rows = parse(text)
    for expected in EXPECTED:
        matches = [metric for metric in rows if all(words in metric for words in expected)]
        assert len(matches) == 1, (expected, list(rows))
    assert len(rows) == len(EXPECTED)
    for metric, (baseline, measured, ratio, _goal) in rows.items():
        cells = f"{baseline} {measured} {ratio}"
        assert not re.search(r"\b(nan|inf)\b", cells, re.IGNORECASE), (metric, cells)
        numbers = [float(n.replace(",", "")) for n in re.findall(r"-?\d[\d,]*\.?\d*(?:e[+-]?\d+)?", cells)]
        assert all(math.isfinite(n) for n in numbers), (metric, cells)
        if ratio:
            assert float(ratio) > 0, (metric, ratio)
        if "MFU" in metric:  # no peak for a CPU: MFU is not guessed
            assert baseline == "peak n/a" and measured.startswith("n/a"), (metric, cells)
        elif not metric.startswith("mnist-mini to"):
            assert numbers, (metric, cells)
