"""Shared helpers for the benchmarks: the machine they ran on, medians, and the table they print."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


@dataclass(frozen=True)
class PlainLoop:
    """Where and how a benchmark's plain PyTorch loop trains, so that one loop serves CPU and GPU, fp32 and bf16:
    the device, the autocast precision ("no" or "bf16", as --mixed-precision), and whether it steps through
    Accelerate's wrappers (`accelerator.prepare`, `accelerator.backward`, the prepared optimizer's step and
    zero_grad), as a textbook Accelerate loop does; the launcher bypasses those wrappers without a grad scaler
    (see `_train` in launcher/train.py). The default is the CPU, fp32, no Accelerate: plain PyTorch."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    precision: str = "no"
    accelerate: bool = False

    def prepare(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[torch.nn.Module, Any, Callable[[torch.Tensor], None], Callable[..., Any]]:
        """(model, optimizer, backward, clip_grad_norm_) for a model already on `device` and its optimizer."""
        if not self.accelerate:
            return model, optimizer, torch.Tensor.backward, torch.nn.utils.clip_grad_norm_
        from accelerate import Accelerator

        accelerator = Accelerator(mixed_precision=self.precision, cpu=self.device.type == "cpu")
        model, optimizer = accelerator.prepare(model, optimizer)
        return model, optimizer, accelerator.backward, accelerator.clip_grad_norm_

    def autocast(self) -> contextlib.AbstractContextManager:
        """Around the forward pass. A prepared model autocasts itself (and returns fp32 outputs)."""
        if self.precision == "no" or self.accelerate:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def sync(self) -> None:
        """Before reading the clock: wait for the device (the launcher reads the loss back once per interval)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def finish(self) -> None:
        """Let the next Accelerator (the launcher's own, in the same process) start from a clean state."""
        if self.accelerate:
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state(reset_partial_state=False)
