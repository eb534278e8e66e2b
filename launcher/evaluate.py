"""Evaluation: loss and top-1 accuracy over the whole evaluation set, summed on the device, reduced once."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from launcher.data import EvalData


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: EvalData, accelerator: Any) -> dict[str, float]:
    """Each process evaluates its own shard (every sample exactly once, no padding); sums are all-reduced.

    `model` should be the unwrapped model: the shards may differ in length by one batch, and a DDP forward
    could otherwise wait for a collective the other processes never enter.
    """
    if accelerator.num_processes > 1:
        # Each rank updated its own BatchNorm statistics in its last training forward (DDP broadcasts rank 0's
        # buffers only at the start of a forward): evaluate with rank 0's, the copy that checkpoints save.
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss, correct, count
    for images, labels in data:
        with accelerator.autocast():
            logits = model(images)
        logits = logits.float()
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += (logits.argmax(dim=1) == labels).sum()
        sums[2] += labels.numel()
    model.train(was_training)
    loss, correct, count = accelerator.reduce(sums, "sum").tolist()
    return {"loss": loss / count, "accuracy": correct / count, "samples": int(count)}
