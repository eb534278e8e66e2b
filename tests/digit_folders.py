"""Real digits from mnist-mini as PNG files in `root/<class>/<image>` folders, for the image-folder tests."""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from torchvision.datasets import MNIST


def write_digit_folders(root: Path, mnist_root: Path, per_class: dict[str, int]) -> Path:
    """`root/<split>/digit<k>/<index>.png` with per_class[split] digits of each class per split, taken in
    order from mnist-mini's training digits (the splits share no digit)."""
    digits = MNIST(mnist_root, train=True)
    wanted = [(split, n) for split, n in per_class.items()]
    taken = [[0] * 10 for _ in wanted]
    for i, (image, label) in enumerate(zip(digits.data, digits.targets.tolist(), strict=True)):
        for (split, n), counts in zip(wanted, taken, strict=True):
            if counts[label] < n:
                folder = root / split / f"digit{label}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(image.numpy()).save(folder / f"{i:05d}.png")
                counts[label] += 1
                break
        if all(c == n for (_, n), counts in zip(wanted, taken, strict=True) for c in counts):
            break
    return root
