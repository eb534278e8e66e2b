"""How samples reach the device, batch by batch, for training and evaluation.

`in_memory` holds the dataset as one uint8 tensor on the device and gathers batches there (no workers, no host
round trip); otherwise a DataLoader over the dataset loads the same index batches with worker processes. The
order comes from `launcher.data.plan`, the transforms from `launcher.data.transforms`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from launcher.data.plan import TrainPlan, epoch_order, mix_seed
from launcher.data.transforms import DeviceTransform
from launcher.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]


def as_image_tensor(image: object) -> torch.Tensor:
    """A dataset item's image as a CHW tensor (PIL images become uint8)."""
    if isinstance(image, Image.Image):
        return pil_to_tensor(image)
    if isinstance(image, torch.Tensor):
        return image
    if isinstance(image, np.ndarray):
        return torch.from_numpy(image)
    raise UserError(
        f"dataset items must be (image, label) with a PIL image or tensor image, got {type(image)}"
    )


def to_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a dataset as (images NCHW, labels int64). torchvision datasets without transforms are read directly."""
    data, targets = getattr(dataset, "data", None), getattr(dataset, "targets", None)
    raw = getattr(dataset, "transform", None) is None and getattr(dataset, "target_transform", None) is None
    if raw and data is not None and targets is not None:
        images = torch.as_tensor(np.asarray(data))
        if images.ndim == 3:  # N,H,W (MNIST)
            images = images[:, None]
        elif images.ndim == 4 and images.shape[-1] in (1, 3):  # N,H,W,C (CIFAR)
            images = images.permute(0, 3, 1, 2)
        return images.contiguous(), torch.as_tensor(np.asarray(targets), dtype=torch.int64)
    items = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    images = torch.stack([as_image_tensor(x) for x, _ in items])
    return images, torch.tensor([int(y) for _, y in items], dtype=torch.int64)


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        image, label = self.dataset[i]
        return as_image_tensor(image), int(label), i


class Source:
    """Where samples come from: a tensor on the device (in_memory) or a DataLoader over the dataset."""

    def __init__(self, dataset: Dataset, in_memory: bool, device: torch.device, num_workers: int) -> None:
        self.device, self.in_memory, self.num_workers = device, in_memory, num_workers
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        if self.num_samples == 0:
            raise UserError("the dataset is empty")
        if in_memory:
            images, labels = to_tensors(dataset)
            self.images, self.labels = images.to(device), labels.to(device)
        else:
            self.dataset = _Indexed(dataset)

    @property
    def index_device(self) -> torch.device:
        return self.device if self.in_memory else torch.device("cpu")

    def batches(
        self, index_batches: Iterable[torch.Tensor], seed: int = 0
    ) -> Iterator[tuple[torch.Tensor, ...]]:
        """(images, labels, indices) on the device for each batch of indices; `seed` seeds loader workers."""
        if self.in_memory:
            for idx in index_batches:
                yield self.images[idx], self.labels[idx], idx
            return
        loader = DataLoader(
            self.dataset,
            batch_sampler=[idx.tolist() for idx in index_batches],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
            # Workers' seeds come from this generator, not from the global RNG: creating an iterator (at a
            # resume, or for an evaluation) must not shift the RNG stream that dropout and friends draw from.
            generator=torch.Generator().manual_seed(seed),
        )
        try:
            for images, labels, idx in loader:
                yield (
                    images.to(self.device, non_blocking=True),
                    labels.to(self.device, non_blocking=True),
                    idx.to(self.device, non_blocking=True),
                )
        except UserError as exc:
            # A worker's UserError (an unreadable image, say) arrives wrapped in the worker's traceback text;
            # the user needs only its message.
            text = str(exc)
            if "Original Traceback" in text:
                text = text.rsplit("UserError: ", 1)[-1].strip()
            raise UserError(text) from None


class TrainData:
    """The training batches of one process, epoch by epoch, from any batch on."""

    def __init__(self, source: Source, plan: TrainPlan, transform: DeviceTransform, seed: int, shuffle: bool):
        self.source, self.plan, self.transform = source, plan, transform
        self.seed, self.shuffle = seed, shuffle

    def __len__(self) -> int:
        return self.plan.batches_per_epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        n = self.plan.num_samples
        order = epoch_order(n, self.seed, epoch, self.shuffle).to(self.source.index_device)
        params = self.transform.epoch_params(n, epoch)
        index_batches = (self.plan.rank_slice(order, b) for b in range(start, len(self)))
        for images, labels, idx in self.source.batches(index_batches, mix_seed(self.seed, epoch, start)):
            yield self.transform.train(images, idx, params), labels


class EvalData:
    """This process's share of the evaluation set: every sample exactly once across processes, no padding."""

    def __init__(self, source: Source, batch_size: int, world: int, rank: int, transform: DeviceTransform):
        self.source, self.transform = source, transform
        self.indices = torch.arange(source.num_samples)[rank::world].to(source.index_device)
        self.batch_size = batch_size

    def __iter__(self) -> Iterator[Batch]:
        # A process whose share is empty (fewer samples than processes) has no batch at all: an empty index
        # batch would reach the DataLoader's collate function, which cannot stack nothing.
        batches = self.indices.split(self.batch_size) if len(self.indices) else ()
        for images, labels, _ in self.source.batches(batches):
            yield self.transform.normalize(images), labels

    def first(self, n: int = 1) -> torch.Tensor:
        """The first n evaluation images of the whole set (the same on every process), normalised (e.g. to count
        FLOPs)."""
        indices = torch.arange(min(n, self.source.num_samples)).to(self.source.index_device)
        images, _, _ = next(self.source.batches([indices]))
        return self.transform.normalize(images)
