"""MNIST digits with a small CNN.

    accelerate launch -m launcher.train recipes/mnist.py --data.root ../shared/data/mnist-mini

Reached (mnist-mini: 8,000 training digits, 2,000 held-out test digits; 2-core CPU, no GPU): 98.95% test
accuracy after the default 3 epochs (375 steps of 64); 31 s wall for the whole command above on an idle
machine (about 15 s of it training, 25 steps/s). 2 processes (gloo) with the same defaults: 98.5%.
Expected on full MNIST (60,000 training digits, `--data.root DIR` of a torchvision download): at least 99.0%
test accuracy with these settings (the same network reaches 99.3-99.5% in the literature-standard setup).
"""

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn
from torchvision.datasets import MNIST

from launcher import DataConfig, Datasets, OptimConfig, ScheduleConfig, TrainConfig
from launcher.data import torchvision_datasets


@dataclass(kw_only=True)
class ModelConfig:
    channels: int = 32
    """Channels of the first convolution block (the second has twice as many)."""
    hidden: int = 128
    """Width of the fully connected layer."""
    dropout: float = 0.25
    """Dropout before the classifier."""


@dataclass(kw_only=True)
class Config(TrainConfig):
    model: ModelConfig = field(default_factory=ModelConfig)


config = Config(
    max_epochs=3,
    data=DataConfig(
        root=Path("data"),
        batch_size=64,
        mean=(0.1307,),
        std=(0.3081,),
        crop_padding=2,  # random shifts of up to 2 pixels: with 8k training digits this is worth ~0.5%
    ),
    optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    schedule=ScheduleConfig(warmup="linear", warmup_epochs=0.3, decay="cosine"),
)


def build_model(cfg: Config) -> nn.Module:
    c, m = cfg.model.channels, cfg.model
    return nn.Sequential(
        nn.Conv2d(1, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
        nn.Conv2d(c, c, 3, padding=1),
        nn.BatchNorm2d(c),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),  # 14x14
        nn.Conv2d(c, 2 * c, 3, padding=1),
        nn.BatchNorm2d(2 * c),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),  # 7x7
        nn.Flatten(),
        nn.Linear(2 * c * 7 * 7, m.hidden),
        nn.ReLU(inplace=True),
        nn.Dropout(m.dropout),
        nn.Linear(m.hidden, 10),
    )


def build_datasets(cfg: Config) -> Datasets:
    train, test = torchvision_datasets(MNIST, cfg.data, example="../shared/data/mnist-mini")
    return Datasets(train=train, eval=test)
