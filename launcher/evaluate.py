"""Evaluation: a task's metrics over the whole evaluation set, summed on the device, reduced once; the test
phase's per-class table and confusion figure for classification."""

from __future__ import annotations

from typing import Any

import torch
from accelerate.utils import convert_to_fp32

from launcher.data import EvalData
from launcher.errors import UserError
from launcher.task import Classification, Task, confusion_matrix


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    data: EvalData,
    accelerator: Any,
    task: Task | None = None,
    collective: bool = False,
) -> tuple[dict[str, float], torch.Tensor | None]:
    """The task's metrics over the whole evaluation set (`Classification()` by default), and for classification
    the confusion matrix (rows: true class, columns: predicted; None for other tasks).

    Each process evaluates its own shard (every sample exactly once, no padding). The task's per-batch sums are
    added up on the device and all-reduced once; a process with an empty share contributes zeros of the shapes
    the others report. `samples` is added to the metrics: how many samples were evaluated.

    `model` should be the unwrapped model: the shards may differ in length by one batch, and a DDP forward could
    otherwise wait for a collective the other processes never enter. A sharded model's forward is such a collective
    (it gathers the parameters): with `collective`, a process with fewer batches runs as many more forwards on the
    set's first sample as the others have batches left, and drops their sums.
    """
    if accelerator.num_processes > 1:
        # Each rank updated its own BatchNorm statistics in its last training forward (DDP broadcasts rank 0's
        # buffers only at the start of a forward): evaluate with rank 0's, the copy that checkpoints save.
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    task = task or Classification()
    was_training = model.training
    model.eval()

    def forward(*args: Any, **kwargs: Any) -> Any:
        # As in training, where Accelerate wraps the prepared model's forward the same way.
        with accelerator.autocast():
            return convert_to_fp32(model(*args, **kwargs))

    totals: dict[str, torch.Tensor] = {}
    for batch in data:
        sums = task.evaluate(forward, batch)
        if not totals:
            _check_sums(task, sums)
        for key, value in sums.items():
            value = torch.as_tensor(value, device=accelerator.device)
            value = value.double() if value.is_floating_point() else value.long()
            totals[key] = totals[key] + value if key in totals else value
    if collective:
        for _ in range(data.most_batches() - data.num_batches()):
            task.evaluate(forward, data.first())
    model.train(was_training)
    totals = _reduce(totals, accelerator)
    metrics = task.metrics(totals)
    _check_metrics(task, metrics)
    return {**metrics, "samples": data.source.num_samples}, confusion_matrix(totals)


def _reduce(totals: dict[str, torch.Tensor], accelerator: Any) -> dict[str, torch.Tensor]:
    """The totals of every process, added up. The processes first agree on the names and shapes (an empty
    share has none), with one small object all-gather per evaluation."""
    if accelerator.num_processes == 1:
        return totals
    local = {k: (tuple(v.shape), v.dtype) for k, v in totals.items()}
    everyone: list[dict[str, Any]] = [{} for _ in range(accelerator.num_processes)]
    torch.distributed.all_gather_object(everyone, local)
    layout = {k: v for share in everyone for k, v in share.items()}
    reduced = {}
    for key, (shape, dtype) in sorted(layout.items()):
        value = totals.get(key, torch.zeros(shape, dtype=dtype, device=accelerator.device))
        reduced[key] = accelerator.reduce(value, "sum")
    return reduced


def _check_sums(task: Task, sums: Any) -> None:
    where = f"{type(task).__qualname__}.evaluate"
    if not isinstance(sums, dict) or not sums:
        raise UserError(f"{where} must return a non-empty dict of sums, got {type(sums).__name__}")
    for key, value in sums.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok or (isinstance(value, torch.Tensor) and (value.is_floating_point() or not value.is_complex()))
        if not ok:
            raise UserError(
                f"{where} returned {key!r} = a {type(value).__name__}: not reducible; return tensors or numbers "
                "that add up over batches and processes (sums and counts), and compute ratios in metrics()"
            )


def _check_metrics(task: Task, metrics: Any) -> None:
    where = f"{type(task).__qualname__}.metrics"
    if not isinstance(metrics, dict):
        raise UserError(f"{where} must return a dict of numbers, got {type(metrics).__name__}")
    if missing := [name for name in task.metric_names if name not in metrics]:
        raise UserError(f"{where} returned no {missing} (the task's metric_names promise them)")
    if bad := [k for k, v in metrics.items() if not isinstance(v, (int, float)) or isinstance(v, bool)]:
        raise UserError(f"{where} returned non-numbers for {bad}; return Python floats (tensor.item())")


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
