"""Model size and cost at start-up: parameter count and forward FLOPs per sample (torch.utils.flop_counter)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, trainable parameters)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


@torch.no_grad()
def forward_flops(model: torch.nn.Module, sample: torch.Tensor) -> int:
    """FLOPs of one forward pass on `sample` (a batch of one), counting a multiply-add as 2, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(sample)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T", "P"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}E"
