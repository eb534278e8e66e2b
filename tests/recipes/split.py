"""Test recipe: the MLP of mlp.py, trained on a random split of the training digits drawn from the global RNG
(as many recipes do: `random_split` without a generator) and evaluated on the first `eval_samples` test digits.

`SPLIT_MISSING_DATA_RANK=R` makes rank R look for the data where there is none, like a node without the data.
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from torch.utils.data import Subset, random_split
from torchvision.datasets import MNIST

from launcher import DataConfig, Datasets, OptimConfig, ScheduleConfig, TrainConfig, UserError


@dataclass(kw_only=True)
class SplitConfig:
    train_samples: int = 6000
    """Digits of the random training split (the rest of the 8000 is left out)."""
    eval_samples: int = 2000
    """First test digits to evaluate on."""


@dataclass(kw_only=True)
class Config(TrainConfig):
    split: SplitConfig = field(default_factory=SplitConfig)


config = Config(
    max_epochs=1,
    data=DataConfig(root=Path("data"), batch_size=32, mean=(0.1307,), std=(0.3081,), download=False),
    optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9),
    schedule=ScheduleConfig(warmup="none", decay="constant"),
)


def build_model(cfg: Config) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


def build_datasets(cfg: Config) -> Datasets:
    root = cfg.data.root
    if os.environ.get("RANK", "0") == os.environ.get("SPLIT_MISSING_DATA_RANK"):
        root = root / "not-on-this-node"
    try:
        train, test = MNIST(root, train=True), MNIST(root, train=False)
    except RuntimeError:
        raise UserError(f"MNIST not found in {root}; pass --data.root DIR of a copy") from None
    part, _ = random_split(train, [cfg.split.train_samples, len(train) - cfg.split.train_samples])
    return Datasets(train=part, eval=Subset(test, range(cfg.split.eval_samples)))
