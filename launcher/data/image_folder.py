"""Your own images, laid out as `root/<class>/<image>`: torchvision's ImageFolder, resized on load, with a
deterministic per-class train/validation split and a `UserError` for every layout problem a user can make.

The folder names are the class names; labels are their indices in sorted order (as in ImageFolder), so the
validation folder must hold exactly the same class folders. Hidden folders (`.ipynb_checkpoints`, `.git`) are
not classes. Images are decoded, converted to the configured channels and resized when they are loaded; the
random crop, flip and normalisation run later, on the device (`launcher.data`).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from launcher.config import DataConfig
from launcher.errors import UserError


@dataclass(kw_only=True)
class ImageFolderData(DataConfig):
    root: Path = Path("images")
    """Training images, one folder per class: root/<class>/<image>; the folder names are the class names."""
    val_root: Path | None = None
    """Validation images, with the same class folders as root (unset: hold out val_fraction of root)."""
    val_fraction: float = 0.1
    """Without val_root: the fraction of each class's images held out for validation."""
    split_seed: int = 0
    """Seed of the train/validation split (not --seed: runs with other seeds validate on the same images)."""
    image_size: int = 64
    """Resize on load: the shorter side to this many pixels, then keep the centre square."""
    channels: Literal[1, 3] = 3
    """Colour channels every image is converted to: 1 (greyscale) or 3 (RGB)."""


def find_class_folders(root: Path, flag: str = "--data.root") -> list[str]:
    """The sorted class folder names under `root`, or a UserError that says what the layout should be."""
    root = Path(root)
    layout = f"expected {root}/<class>/<image>, e.g. {root}/cat/0001.jpg, one folder per class"
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise UserError(f"image folder {root} ({flag}) {what}; {layout}")
    entries = list(os.scandir(root))
    classes = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not classes:
        loose = sum(1 for e in entries if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        hint = f"; it holds {loose} images directly: move them into one folder per class" if loose else ""
        raise UserError(f"image folder {root} ({flag}) has no class folders{hint}; {layout}")
    return classes


def load_image(path: str, mode: str) -> Image.Image:
    """Decode one image file into `mode` ("L" or "RGB"); a file PIL cannot read is a UserError naming it."""
    try:
        with Image.open(path) as image:
            return image.convert(mode)  # converting decodes the whole file, so truncation shows here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"cannot read image {path}: {exc}. Repair or remove the file") from None


class ClassFolders(ImageFolder):
    """ImageFolder over `root/<class>/<image>` that resizes on load and reports layout problems by name."""

    def __init__(self, root: Path, image_size: int, channels: int, flag: str = "--data.root") -> None:
        self.flag = flag  # find_classes, called by ImageFolder.__init__, names the flag in its errors
        resize = transforms.Compose([transforms.Resize(image_size), transforms.CenterCrop(image_size)])
        loader = partial(load_image, mode="L" if channels == 1 else "RGB")  # a partial pickles into workers
        super().__init__(str(root), transform=resize, loader=loader, allow_empty=True)
        counts = torch.bincount(torch.tensor(self.targets, dtype=torch.int64), minlength=len(self.classes))
        empty = [name for name, count in zip(self.classes, counts.tolist(), strict=True) if count == 0]
        if empty:
            raise UserError(
                f"class folder(s) {', '.join(str(Path(root) / c) for c in empty)} ({flag}) hold no images "
                f"(looked for {' '.join(IMG_EXTENSIONS)}); add images or remove the folder"
            )

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = find_class_folders(Path(directory), self.flag)
        return classes, {name: i for i, name in enumerate(classes)}

    def check_headers(self) -> None:
        """Open every file's header (not its pixels): a file that is no image fails here, before training,
        rather than later inside a DataLoader worker, whose error comes back wrapped in its traceback."""
        bad = []
        for path, _ in self.samples:
            try:
                with Image.open(path):
                    pass
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
                bad.append(f"{path} ({exc})")
        if bad:
            more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
            raise UserError(
                f"cannot read {len(bad)} image(s) ({self.flag}); repair or remove them:\n  "
                + "\n  ".join(bad[:10])
                + more
            )

    def subset(self, indices: list[int]) -> ClassFolders:
        """The same folder restricted to some samples (classes and loading unchanged)."""
        part = copy.copy(self)
        part.samples = [self.samples[i] for i in indices]
        part.imgs = part.samples
        part.targets = [label for _, label in part.samples]
        return part


def split_by_class(folder: ClassFolders, val_fraction: float, seed: int) -> tuple[ClassFolders, ClassFolders]:
    """Hold out `val_fraction` of each class (at least one image of each stays for training), chosen by `seed`
    alone: the same files, sorted by ImageFolder, always give the same split."""
    if not 0.0 < val_fraction < 1.0:
        raise UserError(
            f"--data.val-fraction must be between 0 and 1 (got {val_fraction}), or pass --data.val-root DIR"
        )
    generator = torch.Generator().manual_seed(seed)
    targets = torch.tensor(folder.targets)
    train, val = [], []
    for label in range(len(folder.classes)):
        members = (targets == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        held_out = min(round(len(members) * val_fraction), len(members) - 1)
        val += members[:held_out]
        train += members[held_out:]
    if not val:
        raise UserError(
            f"--data.val-fraction {val_fraction} of {len(folder)} images in {folder.root} holds out none; "
            "raise it or pass --data.val-root DIR"
        )
    return folder.subset(sorted(train)), folder.subset(sorted(val))


def open_image_folders(cfg: ImageFolderData) -> tuple[ClassFolders, ClassFolders]:
    """Training and validation images: `val_root` when set, else a per-class split of `root`."""
    for flag, values in (("--data.mean", cfg.mean), ("--data.std", cfg.std)):
        if len(values) not in (0, 1, cfg.channels):
            raise UserError(
                f"{flag} has {len(values)} values but --data.channels is {cfg.channels}: give one per "
                "channel, or one for all"
            )
    train = ClassFolders(cfg.root, cfg.image_size, cfg.channels, "--data.root")
    if cfg.val_root is None:
        train, val = split_by_class(train, cfg.val_fraction, cfg.split_seed)
    else:
        val = ClassFolders(cfg.val_root, cfg.image_size, cfg.channels, "--data.val-root")
        missing = sorted(set(train.classes) - set(val.classes))
        extra = sorted(set(val.classes) - set(train.classes))
        if missing or extra:
            problems = [f"lacks class folder(s) {', '.join(missing)} that {cfg.root} has"] if missing else []
            problems += [f"has class folder(s) {', '.join(extra)} that {cfg.root} lacks"] if extra else []
            raise UserError(
                f"validation folder {cfg.val_root} (--data.val-root) {' and '.join(problems)}; both need the "
                "same class folders, since a label is a class's index among them"
            )
    if not cfg.in_memory:  # in memory, every image is decoded at the start anyway
        train.check_headers()
        val.check_headers()
    return train, val
