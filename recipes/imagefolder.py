"""Your own images, one folder per class (root/<class>/<image>), with a small CNN or any model by import path.

    python -m launcher.train recipes/imagefolder.py --data.root photos/train --data.val-root photos/val
    python -m launcher.train recipes/imagefolder.py --data.root photos --data.val-fraction 0.2 \
        --data.image-size 96
    python -m launcher.train recipes/imagefolder.py --data.root photos \
        --model.target torchvision.models.resnet18 --model.kwargs '{"num_classes": 5}'

Without --data.val-root, --data.val-fraction of every class is held out, chosen by --data.split-seed. Images
are decoded and resized once when the run starts (--data.no-in-memory --data.num-workers 4 streams them
instead, for folders too big for memory). The class names, in label order, are printed and in <run>/train.log.

Reached on 1,000 training and 500 validation PNG digits (100 and 50 per class, written from mnist-mini by
tests/digit_folders.py; 2-core CPU shared with other jobs, no GPU), with the settings digits need:

    python -m launcher.train recipes/imagefolder.py --data.root digits/train --data.val-root digits/val \
        --data.channels 1 --data.no-hflip --data.image-size 28 --data.mean 0.1307 --data.std 0.3081

97.4% validation accuracy after the default 30 epochs (450 steps of 64; best 97.8% at epoch 18), 216 s for
the whole command.
"""

import logging
from dataclasses import dataclass, field

from torch import nn

from launcher import (
    Datasets,
    ImageFolderData,
    ModelTarget,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    build_from_target,
    check_output,
    find_class_folders,
    open_image_folders,
)

log = logging.getLogger("launcher")


@dataclass(kw_only=True)
class ModelConfig(ModelTarget):
    width: int = 32
    """Channels of the first convolution stage (the next two have 2x and 4x as many)."""
    dropout: float = 0.2
    """Dropout before the classifier."""


@dataclass(kw_only=True)
class Config(TrainConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    data: ImageFolderData = field(default_factory=ImageFolderData)


config = Config(
    max_epochs=30,
    data=ImageFolderData(
        batch_size=64,
        image_size=64,
        # ImageNet's channel statistics: right for photos and for torchvision's pretrained weights.
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        crop_padding=4,  # shifts of up to 1/16 of the image
        hflip=True,  # photos; turn it off (--data.no-hflip) for digits, text and anything with a handedness
    ),
    optim=OptimConfig(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
    schedule=ScheduleConfig(warmup="linear", warmup_epochs=1, decay="cosine"),
)


def build_model(cfg: Config) -> nn.Module:
    num_classes = len(find_class_folders(cfg.data.root))
    if cfg.model.target:
        model = build_from_target(cfg.model.target, cfg.model.kwargs)
        shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
        check_output(model, shape, num_classes, f"--model.target {cfg.model.target}")
        return model

    def stage(c_in: int, c_out: int) -> list[nn.Module]:
        return [
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]

    w = cfg.model.width
    return nn.Sequential(
        *stage(cfg.data.channels, w),
        nn.MaxPool2d(2),
        *stage(w, 2 * w),
        nn.MaxPool2d(2),
        *stage(2 * w, 4 * w),
        nn.AdaptiveAvgPool2d(1),  # any --data.image-size ends in one vector per image
        nn.Flatten(),
        nn.Dropout(cfg.model.dropout),
        nn.Linear(4 * w, num_classes),
    )


def build_datasets(cfg: Config) -> Datasets:
    train, val = open_image_folders(cfg.data)
    log.info(
        "%d classes (label: folder): %s",
        len(train.classes),
        ", ".join(f"{i}: {c}" for i, c in enumerate(train.classes)),
    )
    source = (
        f"{cfg.data.val_root}"
        if cfg.data.val_root
        else f"{cfg.data.val_fraction:g} of each class, split seed {cfg.data.split_seed}"
    )
    log.info(
        "%d training images from %s, %d validation images (%s)", len(train), cfg.data.root, len(val), source
    )
    return Datasets(train=train, eval=val)
