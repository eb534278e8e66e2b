"""Model size and cost at start-up: parameter count and forward FLOPs per sample (torch.utils.flop_counter)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@torch.no_grad()
def forward_flops(
    model: torch.nn.Module, batch: Any, forward: Callable[[torch.nn.Module, Any], Any] | None = None
) -> int:
    """FLOPs of one forward pass on `batch` (a batch of one sample), counting a multiply-add as 2, in eval mode.
    `forward(model, batch)` calls the model (a task's forward); by default `model(batch)`."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            forward(model, batch) if forward is not None else model(batch)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def human(n: float, unit: str = "") -> str:
    """A count for people, with SI prefixes: human(1.2e6) = "1.2M"; with a unit, human(2_250_000, "B") = "2.25 MB"."""
    prefixes = ("", "k", "M", "G", "T", "P", "E")
    i = 0
    while (
        abs(n) >= 999.5 and i < len(prefixes) - 1
    ):  # what rounds to 1000 at 3 digits is 1 of the next prefix
        n, i = n / 1000, i + 1
    return f"{n:.3g} {prefixes[i]}{unit}" if unit else f"{n:.3g}{prefixes[i]}"
