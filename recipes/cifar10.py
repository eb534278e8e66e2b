"""CIFAR-10 with a ResNet-18 adapted to 32x32 images, or the classic LeNet-5 as a small variant.

    accelerate launch -m launcher.train recipes/cifar10.py --data.root data --mixed-precision bf16
    accelerate launch -m launcher.train recipes/cifar10.py --model.arch lenet --max-epochs 30
    python -m launcher.train recipes/cifar10.py --data.fake-samples 256 --max-steps 8 --data.batch-size 32

Expected on one GPU (an estimate, not measured: this machine has no GPU and cannot download CIFAR-10): at
least 94% test accuracy for the ResNet-18 with the defaults (100 epochs), typically about 95%, as published
for this network and recipe (3x3 stem without max-pool, SGD 0.1 with nesterov momentum, weight decay 5e-4,
batch 128, crops with 4 pixels of padding and flips, cosine decay). Time: about 10-20 minutes with bf16 on one
A100/H100-class GPU (100 epochs x 50,000 images at the 5,000-10,000 images/s such a GPU trains this network
at, about 3.3 GFLOPs per image and step; the data stays on the GPU). LeNet-5: roughly 65-75% (also an
estimate).

Measured, the offline smoke run (the third command: 256 random FakeData images with random labels, so it
checks the pipeline, not accuracy; accuracy stays near 10%) on this 2-core CPU shared with other jobs: 8
steps + evaluation of 64 images in 29-35 s for the whole command (ResNet-18 trains at 7-15 images/s here),
8 s with --model.arch lenet (500 images/s once warm).
"""

from dataclasses import dataclass, field
from typing import Literal

from torch import nn
from torchvision.datasets import CIFAR10, FakeData
from torchvision.models import resnet18

from launcher import (
    DataConfig,
    Datasets,
    ModelTarget,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    build_from_target,
    check_output,
)
from launcher.data import torchvision_datasets


@dataclass(kw_only=True)
class ModelConfig(ModelTarget):
    arch: Literal["resnet18", "lenet"] = "resnet18"
    """resnet18: torchvision's, 3x3 stride-1 stem, no max-pool (11.2M parameters); lenet: LeNet-5 (62K)."""


@dataclass(kw_only=True)
class CifarData(DataConfig):
    fake_samples: int = 0
    """Offline smoke test: this many random FakeData images (random labels) instead of CIFAR-10 (0: off)."""


@dataclass(kw_only=True)
class Config(TrainConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: CifarData = field(default_factory=CifarData)


config = Config(
    max_epochs=100,  # 390 steps of 128 per epoch, 39,000 in all
    data=CifarData(
        batch_size=128,
        # Per-channel statistics of the 50,000 training images.
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
        crop_padding=4,
        hflip=True,
    ),
    optim=OptimConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
    schedule=ScheduleConfig(warmup="linear", warmup_epochs=2, decay="cosine"),
)


def build_model(cfg: Config) -> nn.Module:
    if cfg.model.target:
        model = build_from_target(cfg.model.target, cfg.model.kwargs)
        check_output(model, (3, 32, 32), 10, f"--model.target {cfg.model.target}")
        return model
    if cfg.model.arch == "lenet":
        return nn.Sequential(
            nn.Conv2d(3, 6, 5),  # 28x28
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(6, 16, 5),  # 10x10
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 5x5
            nn.Flatten(),
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, 10),
        )
    # The ImageNet stem (7x7 stride 2, then a max-pool) would shrink 32x32 to 8x8 before the first block; a
    # 3x3 stride-1 stem keeps 32x32, so the four stages see 32, 16, 8 and 4 pixels.
    model = resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build_datasets(cfg: Config) -> Datasets:
    if cfg.data.fake_samples > 0:
        n = cfg.data.fake_samples
        return Datasets(
            train=FakeData(n, image_size=(3, 32, 32), num_classes=10, random_offset=0),
            # A different offset: FakeData seeds image i with i + offset, so the sets share no images.
            eval=FakeData(max(1, n // 4), image_size=(3, 32, 32), num_classes=10, random_offset=n),
        )
    smoke = "use --data.fake-samples 256 for an offline smoke run on random images"
    train, test = torchvision_datasets(CIFAR10, cfg.data, offline=smoke)
    return Datasets(train=train, eval=test)
