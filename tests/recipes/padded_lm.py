"""Test recipe: a tiny next-character model on the first lines of tiny-shakespeare, one line per sample, padded
to the longest line: targets past a line's end are `ignore_index`, so micro-batches count different numbers of
tokens. `--kind classify` instead classifies each line (its length mod 4) with the default per-sample loss.

One SGD step with lr 1 and no momentum moves the weights by exactly minus the gradient, which the tests compare
with a plain PyTorch computation over the same global batch.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

from launcher import (
    CheckpointConfig,
    Classification,
    DataConfig,
    Datasets,
    Loss,
    OptimConfig,
    ScheduleConfig,
    Task,
    TrainConfig,
)

TEXT = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"
IGNORE = -100


@dataclass(kw_only=True)
class Config(TrainConfig):
    kind: Literal["lm", "classify"] = "lm"
    """lm: next character, loss per real token; classify: one label per line, loss per sample."""
    lines: int = 32
    """How many lines of the text are the training set."""
    padding: Literal["dataset", "batch"] = "dataset"
    """dataset: every line padded to the longest of all (tensors); batch: a collate_fn pads each batch's lines."""


config = Config(
    max_steps=1,
    eval_every_epochs=0,
    key_metric="loss",
    key_metric_mode="min",
    data=DataConfig(batch_size=8, eval_batch_size=8, download=False),
    optim=OptimConfig(name="sgd", lr=1.0, momentum=0.0),
    schedule=ScheduleConfig(decay="constant"),
    checkpoint=CheckpointConfig(every_epochs=0),
)


def lines(n: int) -> list[str]:
    found = [line for line in TEXT.read_text().splitlines() if line.strip()]
    return found[:n]


def tensors(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs padded with 0, next-character targets padded with IGNORE, line-length classes)."""
    chosen = lines(n)
    width = max(len(line) for line in chosen) - 1
    inputs = torch.zeros(n, width, dtype=torch.int64)
    targets = torch.full((n, width), IGNORE, dtype=torch.int64)
    for i, line in enumerate(chosen):
        codes = torch.tensor([ord(c) % 64 for c in line])
        inputs[i, : len(line) - 1], targets[i, : len(line) - 1] = codes[:-1], codes[1:]
    return inputs, targets, torch.tensor([len(line) % 4 for line in chosen])


class TinyModel(nn.Module):
    def __init__(self, outputs: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.out = nn.Linear(16, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.embed(x)))


class LineClassifier(TinyModel):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).mean(1)


def build_model(cfg: Config) -> nn.Module:
    return TinyModel(64) if cfg.kind == "lm" else LineClassifier(4)


class Lines(torch.utils.data.Dataset):
    """The lines unpadded: item i is (inputs, targets) of line i, of its own length."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.items = [(x[t != IGNORE], t[t != IGNORE]) for x, t in zip(inputs, targets, strict=True)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.items[i]


def pad(items: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of lines padded to its own longest line."""
    inputs = nn.utils.rnn.pad_sequence([x for x, _ in items], batch_first=True, padding_value=0)
    targets = nn.utils.rnn.pad_sequence([t for _, t in items], batch_first=True, padding_value=IGNORE)
    return inputs, targets


def build_datasets(cfg: Config) -> Datasets:
    inputs, targets, classes = tensors(cfg.lines)
    if cfg.padding == "batch":
        lines = Lines(inputs, targets)
        return Datasets(train=lines, eval=lines)
    data = TensorDataset(inputs, targets if cfg.kind == "lm" else classes)
    return Datasets(train=data, eval=data)


class PaddedLM(Task):
    def loss(self, model, batch) -> Loss:
        inputs, targets = batch
        logits = model(inputs)
        total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")
        return Loss(total, count=(targets != IGNORE).sum())

    def evaluate(self, model, batch) -> dict:
        loss = self.loss(model, batch)
        return {"loss": loss.sum, "tokens": loss.count}

    def metrics(self, totals: dict) -> dict:
        return {"loss": totals["loss"].item() / totals["tokens"].item()}


def build_task(cfg: Config) -> Task:
    if cfg.kind == "classify":
        return Classification(images=False)
    task = PaddedLM()
    if cfg.padding == "batch":
        task.collate_fn = pad
    return task
