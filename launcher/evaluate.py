"""Evaluation: loss and top-1 accuracy over the whole evaluation set, summed on the device, reduced once."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from launcher.data import EvalData


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: EvalData, accelerator: Any
) -> tuple[dict[str, float], torch.Tensor]:
    """Loss, accuracy and sample count, and the confusion matrix (rows: true class, columns: predicted).

    Each process evaluates its own shard (every sample exactly once, no padding); sums are all-reduced.

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
    confusion = torch.zeros(0, dtype=torch.int64, device=accelerator.device)
    for images, labels in data:
        with accelerator.autocast():
            logits = model(images)
        logits = logits.float()
        predicted = logits.argmax(dim=1)
        sums[0] += F.cross_entropy(logits, labels, reduction="sum")
        sums[1] += (predicted == labels).sum()
        sums[2] += labels.numel()
        classes = logits.shape[1]
        if confusion.numel() == 0:
            confusion = torch.zeros(classes * classes, dtype=torch.int64, device=accelerator.device)
        confusion += torch.bincount(labels * classes + predicted, minlength=classes * classes)
    model.train(was_training)
    classes = int(confusion.numel() ** 0.5)
    if accelerator.num_processes > 1:
        # A process with an empty share saw no logits: agree on the class count before reducing the matrices,
        # whose sizes must match on every process.
        agreed = torch.tensor([classes], device=accelerator.device)
        torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MAX)
        classes = int(agreed.item())
        if confusion.numel() == 0:
            confusion = torch.zeros(classes * classes, dtype=torch.int64, device=accelerator.device)
    loss, correct, count = accelerator.reduce(sums, "sum").tolist()
    confusion = accelerator.reduce(confusion, "sum").view(classes, classes).cpu()
    return {"loss": loss / count, "accuracy": correct / count, "samples": int(count)}, confusion


def per_class_table(confusion: torch.Tensor, names: list[str] | None = None) -> str:
    """Per-class accuracy and, for up to 20 classes, the confusion matrix, as a terminal table."""
    classes = confusion.shape[0]
    names = [str(n) for n in names] if names and len(names) == classes else [str(i) for i in range(classes)]
    totals = confusion.sum(1)
    width = max(5, *(len(n) for n in names))
    lines = [f"{'class':<{width}}  {'samples':>7}  {'accuracy':>8}"]
    for i, name in enumerate(names):
        acc = confusion[i, i].item() / totals[i].item() if totals[i] else float("nan")
        lines.append(f"{name:<{width}}  {totals[i].item():>7}  {acc:>8.4f}")
    if classes <= 20:
        cell = max(4, len(str(confusion.max().item())) + 1)
        lines += ["", "confusion matrix (rows: true class, columns: predicted)"]
        lines.append(" " * width + "".join(f"{j:>{cell}}" for j in range(classes)))
        for i in range(classes):
            lines.append(f"{names[i]:<{width}}" + "".join(f"{v:>{cell}}" for v in confusion[i].tolist()))
    return "\n".join(lines)


def confusion_figure(confusion: torch.Tensor, names: list[str] | None = None) -> Any:
    """A matplotlib figure of the row-normalised confusion matrix (for TensorBoard's image tab)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = confusion.shape[0]
    rates = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * classes, 1 + 0.5 * classes))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ticks = list(range(classes))
    labels = [str(n) for n in names] if names and len(names) == classes else [str(i) for i in ticks]
    ax.set_xticks(ticks, labels, rotation=90)
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true class")
    if classes <= 20:
        for i in ticks:
            for j in ticks:
                ax.text(
                    j,
                    i,
                    int(confusion[i, j]),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black",
                )
    fig.tight_layout()
    return fig
