"""Test recipe: an MLP on the real mnist-mini digits; no batch-norm or dropout, so batches are independent.

`SEEN_DTYPES` records the dtype of every Linear output (forward hooks), for the mixed-precision tests.
"""

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from torchvision.datasets import MNIST

from launcher import DataConfig, Datasets, OptimConfig, ScheduleConfig, TrainConfig

SEEN_DTYPES: set = set()


@dataclass(kw_only=True)
class ModelConfig:
    hidden: int = 64
    """Hidden width."""


@dataclass(kw_only=True)
class Config(TrainConfig):
    model: ModelConfig = field(default_factory=ModelConfig)


config = Config(
    max_epochs=1,
    data=DataConfig(root=Path("data"), batch_size=32, mean=(0.1307,), std=(0.3081,), download=False),
    optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9),
    schedule=ScheduleConfig(warmup="linear", warmup_steps=10, decay="cosine"),
)


def build_model(cfg: Config) -> nn.Module:
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(784, cfg.model.hidden), nn.ReLU(), nn.Linear(cfg.model.hidden, 10)
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            layer.register_forward_hook(lambda mod, inp, out: SEEN_DTYPES.add(out.dtype))
    return model


def build_datasets(cfg: Config) -> Datasets:
    return Datasets(train=MNIST(cfg.data.root, train=True), eval=MNIST(cfg.data.root, train=False))
