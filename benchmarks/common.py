"""Shared helpers for the benchmarks: the machine they ran on, medians, and the table they print."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MNIST_MINI = REPO.parent / "shared" / "data" / "mnist-mini"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    threads = torch.get_num_threads()
    return f"{cpu}, {os.cpu_count()} cores ({threads} torch threads){gpu}; torch {torch.__version__}"


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def alternate(rounds: int, runs: dict[str, Callable[[], list[float]]]) -> dict[str, list[float]]:
    """Run each callable once per round, in alternating order, and pool what they return."""
    pooled: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            pooled[name] += runs[name]()
    return pooled


def table(rows: list[tuple], header: tuple) -> str:
    cells = [header, *[tuple(str(c) for c in row) for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def command() -> str:
    """How this benchmark was started, as `python -m benchmarks.NAME ARGS` from the repository root."""
    return " ".join(["python -m benchmarks." + Path(sys.argv[0]).stem, *sys.argv[1:]])
