"""What a recipe computes, while the library owns how it is trained: the loss of a batch, the evaluation metrics,
the batch format and the optimizer's parameter groups.

A recipe that defines `build_task(cfg) -> Task` gets its own; one that does not trains an image classifier
(`Classification()`: cross-entropy, accuracy, a confusion matrix in the test phase).

Exact normalisation. `Task.loss` returns a *sum* over the units the loss averages over (samples, tokens, pixels)
and their *count*. The loop divides by the count over the whole accumulation window and all processes, so that
accumulation and DDP give exactly the big-batch gradient, also when the count varies between micro-batches
(padding with `ignore_index`, masks). When the count is left out (None), the units are the batch's samples, which
the sampling plan knows before the forward pass: the loop scales each micro-batch's loss by
processes / samples-in-window, as it always has. When a count is given, the loop backpropagates the plain sums,
adds up the counts of the window on the device, all-reduces that one number at the window's last micro-batch
(together with DDP's gradient all-reduce) and multiplies the gradients by processes / count before clipping and
the step: no host sync, one extra scalar all-reduce per optimizer step.

Metrics. `Task.evaluate` returns sums for one batch (tensors or numbers, any shape, the same shapes on every
batch); the library adds them up over the batches on the device, all-reduces them once across processes, and
`Task.metrics` turns the totals into the reported numbers. Accuracy, MSE, MAE, R², perplexity and IoU all fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from launcher.config import OptimConfig


@dataclass
class Loss:
    """What `Task.loss` returns for one micro-batch."""

    sum: torch.Tensor
    """The loss summed over the batch's units (a scalar tensor with a gradient)."""
    count: torch.Tensor | int | None = None
    """How many units `sum` adds up (tokens that count, pixels in the mask); None: the batch's samples."""
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    """More sums over the same units, logged as train/NAME = sum / count over each logging interval."""


def output_tensor(output: Any, key: str = "logits") -> torch.Tensor:
    """The tensor a model returned: the output itself, the first item of a tuple, or `key` of a dict or of a
    ModelOutput-like object (HF transformers)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        return output[key]
    if isinstance(output, (tuple, list)):
        return output[0]
    if hasattr(output, key):
        return getattr(output, key)
    raise TypeError(f"cannot find a tensor in the model's output of type {type(output).__name__}")


class Task:
    """What is computed for a batch. Subclass it and override what differs; `Classification` is the default.

    The batch is what the data path yields, on the device: any nested tuple, list, dict or dataclass of tensors.
    """

    metric_names: tuple[str, ...] = ("loss",)
    """The names `metrics` returns; `--key-metric` must be one of them. `loss` is always one."""
    images: bool = False
    """Batches are (image, label) pairs of an image dataset: PIL images become uint8 tensors, labels int64, and
    --data.mean/std/crop-padding/hflip normalise and augment the images on the device."""
    collate_fn: Callable[[list[Any]], Any] | None = None
    """How a list of dataset items becomes a batch (torch's default_collate when None)."""

    def forward(self, model: Callable[..., Any], batch: Any) -> Any:
        """The model's output for a batch: `model(batch[0])` for a tuple or list, `model(**batch)` for a dict."""
        if isinstance(batch, Mapping):
            return model(**batch)
        return model(batch[0] if isinstance(batch, (tuple, list)) else batch)

    def loss(self, model: Callable[..., Any], batch: Any) -> Loss:
        """The loss of one training micro-batch (see `Loss`)."""
        raise NotImplementedError

    def evaluate(self, model: Callable[..., Any], batch: Any) -> dict[str, torch.Tensor | float]:
        """Sums for one evaluation batch, e.g. {"loss": ..., "count": ...}. `model` runs under the run's mixed
        precision and returns float32."""
        raise NotImplementedError

    def metrics(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """The reported metrics from the sums of `evaluate` over the whole evaluation set (all processes)."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]] | None:
        """The optimizer's parameter groups ({"params": [...], "lr": ..., "weight_decay": ...}); a group's lr is
        its peak, which the schedule scales. None: all parameters in one group with --optim's settings."""
        return None


class Classification(Task):
    """Cross-entropy, top-1 accuracy and the confusion matrix: the default task."""

    metric_names = ("loss", "accuracy")

    def __init__(self, images: bool = True) -> None:
        self.images = images

    def loss(self, model: Callable[..., Any], batch: Any) -> Loss:
        logits = output_tensor(self.forward(model, batch))
        return Loss(F.cross_entropy(logits, batch[1], reduction="sum"))

    def evaluate(self, model: Callable[..., Any], batch: Any) -> dict[str, torch.Tensor | float]:
        labels = batch[1]
        logits = output_tensor(self.forward(model, batch))
        predicted = logits.argmax(dim=1)
        classes = logits.shape[1]
        return {
            "loss": F.cross_entropy(logits, labels, reduction="sum"),
            "correct": (predicted == labels).sum(),
            "count": labels.numel(),
            "confusion": torch.bincount(labels * classes + predicted, minlength=classes * classes),
        }

    def metrics(self, totals: dict[str, torch.Tensor]) -> dict[str, float]:
        count = totals["count"].item()
        return {"loss": totals["loss"].item() / count, "accuracy": totals["correct"].item() / count}


def confusion_matrix(totals: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The confusion matrix (rows: true class, columns: predicted) of a classification's totals, if any."""
    flat = totals.get("confusion")
    if flat is None:
        return None
    classes = math.isqrt(flat.numel())
    return flat.view(classes, classes).cpu()


def no_decay_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """Weight decay on the weights of matmuls and convolutions only (tensors of 2 or more dimensions); none on
    biases, norm weights and other vectors (nanoGPT's and most transformer recipes' rule)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": optim.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
