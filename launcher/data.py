"""The data path: which samples each process sees, in which order, and how they reach the device.

Order. Every epoch has one global order, a permutation seeded by (seed, epoch) alone, so it does not depend on
the number of processes. Global micro-batch b is the slice order[b*G:(b+1)*G] with G = batch_size x processes;
process r takes every world-th sample of it (slice[r::world]). Hence 2 processes with batch B see, per step,
exactly the samples 1 process with batch 2B sees, and a resumed run can start at any batch of an epoch.

Transforms. Normalisation and augmentation (random crop with zero padding, horizontal flip) run on the device,
in batches, in both data paths. Augmentation parameters are drawn once per epoch for every sample index from a
generator seeded by (seed, epoch), so a sample is augmented the same way whatever process, batch or resume it
falls in.

Sources. `in_memory` holds the dataset as one uint8 tensor on the device and gathers batches there (no workers,
no host round trip); otherwise a DataLoader over the dataset loads the same index batches with worker processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import pil_to_tensor

from launcher.config import DataConfig
from launcher.errors import UserError

Batch = tuple[torch.Tensor, torch.Tensor]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers; nearby inputs give unrelated seeds."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The global sample order of an epoch (CPU int64), a pure function of (n, seed, epoch)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(seed, epoch)))


@dataclass(frozen=True)
class TrainPlan:
    """How an epoch's global order splits into micro-batches and across processes."""

    num_samples: int
    batch_size: int  # per process
    world: int
    rank: int
    drop_last: bool

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world

    @property
    def batches_per_epoch(self) -> int:
        full, rest = divmod(self.num_samples, self.global_batch)
        # A last partial batch is kept only when every process gets at least one sample of it.
        return full + int(not self.drop_last and rest >= self.world)

    def global_count(self, b: int) -> int:
        """Samples in global micro-batch b (all processes together)."""
        return min(self.global_batch, self.num_samples - b * self.global_batch)

    def rank_slice(self, order: torch.Tensor, b: int) -> torch.Tensor:
        start = b * self.global_batch
        return order[start : start + self.global_batch][self.rank :: self.world]


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


class DeviceTransform:
    """Normalisation and augmentation of uint8 (or [0,1] float) image batches, on the device."""

    def __init__(self, cfg: DataConfig, seed: int, device: torch.device) -> None:
        self.seed, self.device = seed, device
        self.padding, self.hflip = cfg.crop_padding, cfg.hflip
        if cfg.mean:
            std = torch.tensor(cfg.std, device=device).view(1, -1, 1, 1)
            self.mean = torch.tensor(cfg.mean, device=device).view(1, -1, 1, 1)
            self.inv_std = 1.0 / std
        else:
            self.mean = self.inv_std = None
        self._aranges: dict[int, torch.Tensor] = {}

    @property
    def augments(self) -> bool:
        return self.padding > 0 or self.hflip

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if self.mean is not None:
            x = x.sub_(self.mean).mul_(self.inv_std)
        return x

    def epoch_params(self, num_samples: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Crop offsets (N, 2) and flip flags (N,) for every sample of the epoch."""
        if not self.augments:
            return None
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, 0xA0))
        offsets = torch.randint(0, 2 * self.padding + 1, (num_samples, 2), generator=g)
        flips = torch.rand(num_samples, generator=g) < 0.5
        return offsets.to(self.device), flips.to(self.device)

    def train(self, x: torch.Tensor, idx: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor] | None):
        if params is not None:
            offsets, flips = params
            if self.padding > 0:
                x = self._crop(x, offsets[idx])
            if self.hflip:
                x = torch.where(flips[idx].view(-1, 1, 1, 1), x.flip(3), x)
        return self.normalize(x)

    def _arange(self, n: int) -> torch.Tensor:
        if n not in self._aranges:
            self._aranges[n] = torch.arange(n, device=self.device)
        return self._aranges[n]

    def _crop(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Zero-pad by `padding` and cut each image's window at its own offset: two gathers, no Python loop."""
        b, c, h, w = x.shape
        p = self.padding
        padded = F.pad(x, (p, p, p, p))
        rows = (offsets[:, 0:1] + self._arange(h)).view(b, 1, h, 1).expand(b, c, h, w + 2 * p)
        cols = (offsets[:, 1:2] + self._arange(w)).view(b, 1, 1, w).expand(b, c, h, w)
        return padded.gather(2, rows).gather(3, cols)


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
