"""How samples reach the device, batch by batch, for training and evaluation.

A batch is whatever the task's batch format is: any nested tuple, list, dict or dataclass of tensors. `in_memory`
holds the dataset on the device and gathers batches there (no workers, no host round trip):
- a dataset with `gather(indices) -> batch` (and `to(device)`) gathers its own batches (`launcher.data.Windows`:
  random windows of a token sequence);
- an image dataset of (image, label) pairs becomes one uint8 image tensor and one int64 label tensor;
- any other dataset is collated once, whole, into one batch of tensors whose rows are then gathered (with a
  task's own `collate_fn`, its items are kept in a list and each batch is collated from them).
Otherwise one DataLoader over the dataset loads the same index batches with worker processes, which persist from
epoch to epoch and seed their RNGs for every batch from (seed, epoch, rank, batch number). The order comes from
`launcher.data.plan`, the image transforms from `launcher.data.transforms`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import signal
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate, get_worker_info
from torchvision.transforms.functional import pil_to_tensor

from launcher.data.plan import TrainPlan, epoch_order, mix_seed
from launcher.data.transforms import DeviceTransform
from launcher.errors import UserError

Batch = Any  # the task's batch: a nested tuple, list, dict or dataclass of tensors


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


def to_device(batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """A batch with every tensor moved to `device`, whatever nests it: tuples (named ones too), lists, dicts and
    dataclasses. Plain numbers, strings and None stay as they are; anything else cannot be moved and is an error.
    (accelerate's send_to_device returns dataclasses unmoved.)"""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (int, float, bool, str, type(None))):
        return batch
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device, non_blocking) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(to_device(v, device, non_blocking) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device, non_blocking) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        changes = {
            f.name: to_device(getattr(batch, f.name), device, non_blocking) for f in dataclasses.fields(batch)
        }
        return dataclasses.replace(batch, **changes)
    raise UserError(
        f"a batch holds a {type(batch).__name__}, which cannot be moved to the device: make the dataset (or the "
        "task's collate_fn) return tensors, numbers, or tuples, lists, dicts and dataclasses of them"
    )


def _index(batch: Any, idx: torch.Tensor) -> Any:
    """The rows `idx` of every tensor of a collated batch."""
    if isinstance(batch, torch.Tensor):
        return batch[idx]
    if isinstance(batch, Mapping):
        return type(batch)({k: _index(v, idx) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_index(v, idx) for v in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_index(v, idx) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        return dataclasses.replace(
            batch, **{f.name: _index(getattr(batch, f.name), idx) for f in dataclasses.fields(batch)}
        )
    return batch


class _Indexed(Dataset):
    """The dataset's items with their index (image items as a uint8 tensor and an int label)."""

    def __init__(self, dataset: Dataset, images: bool) -> None:
        self.dataset, self.images = dataset, images

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, int]:
        item = self.dataset[i]
        if self.images:
            image, label = item
            item = (as_image_tensor(image), int(label))
        return item, i

    def __getitems__(self, key: tuple[int, list[int]]) -> list[tuple[Any, int]]:
        """The items of one batch; `key` is (the batch's seed, its indices), as `_Passes` yields them. In a
        worker, the RNGs are seeded with it first, so that whatever the dataset or the collate_fn draws is a
        function of the batch alone, whichever worker loads it, however long that worker has lived (persistent
        workers serve every epoch), and at a resume. Without workers the loading runs in the main process and
        draws from its RNGs, which must not be reseeded."""
        seed, indices = key
        if get_worker_info() is not None:
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
        return [self[i] for i in indices]


class _Collate:
    """(the batch the task's collate_fn makes of the items, their indices); a class so that workers can pickle it."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any] | None) -> None:
        self.collate_fn = collate_fn or default_collate

    def __call__(self, pairs: list[tuple[Any, int]]) -> tuple[Any, torch.Tensor]:
        return self.collate_fn([item for item, _ in pairs]), torch.tensor([i for _, i in pairs])


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A loader worker's start: it ignores the signals that stop a run (launcher.cluster.preemption's). SLURM
    sends its warning signal (USR1) to every process of the job step and a terminal sends Ctrl-C to the whole
    process group; a worker forked before the loop routes them to its stop flag (an evaluation's, which persist
    from the setup on) would die of them, and the loader would then fail the run instead of letting it save.
    Workers end with the main process anyway: the loader shuts them down, and they watch their parent."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class _Passes:
    """The batch sampler of a Source's one DataLoader: the (seed, indices) batches of the current pass (an epoch,
    or an evaluation), set before the pass starts. The DataLoader iterates its batch sampler afresh at the start
    of each pass, in the main process, also with persistent workers: each pass gets its own order."""

    def __init__(self) -> None:
        self.batches: list[tuple[int, list[int]]] = []

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class Source:
    """Where samples come from: the dataset held on the device (in_memory) or a DataLoader over it."""

    def __init__(
        self,
        dataset: Dataset,
        in_memory: bool,
        device: torch.device,
        num_workers: int,
        images: bool = True,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        prefetch_factor: int = 2,
        persistent_workers: bool = True,
    ) -> None:
        self.device, self.in_memory, self.num_workers = device, in_memory, num_workers
        if prefetch_factor < 1:
            raise UserError(f"--data.prefetch-factor must be at least 1, got {prefetch_factor}")
        self.prefetch_factor, self.persistent_workers = prefetch_factor, persistent_workers
        self.loader: DataLoader | None = None  # made at the first pass, then reused
        self.passes, self.pass_count = _Passes(), 0
        self.images, self.collate = images, _Collate(collate_fn)
        self.num_samples = len(dataset)  # type: ignore[arg-type]
        if self.num_samples == 0:
            raise UserError("the dataset is empty")
        self.gather: Callable[[torch.Tensor], Any]
        self.on_host = False  # in memory, but as a list of items collated batch by batch
        if not in_memory:
            self.dataset = _Indexed(dataset, images)
        elif hasattr(dataset, "gather"):
            moved = dataset.to(device) if hasattr(dataset, "to") else dataset
            self.gather = moved.gather
        elif images:
            tensors = tuple(t.to(device) for t in to_tensors(dataset))
            self.gather = lambda idx: (tensors[0][idx], tensors[1][idx])
        elif collate_fn is None:
            if isinstance(dataset, TensorDataset):  # already one tensor per field
                whole = tuple(t.to(device) for t in dataset.tensors)
            else:
                whole = to_device(default_collate([dataset[i] for i in range(self.num_samples)]), device)
            self.gather = lambda idx: _index(whole, idx)
        else:
            items = [dataset[i] for i in range(self.num_samples)]
            self.on_host = True
            self.gather = lambda idx: to_device(collate_fn([items[i] for i in idx.tolist()]), device)

    @property
    def index_device(self) -> torch.device:
        return self.device if self.in_memory and not self.on_host else torch.device("cpu")

    def batches(
        self, index_batches: Iterable[torch.Tensor], seed: int = 0, start: int = 0
    ) -> Iterator[tuple[Any, torch.Tensor]]:
        """(batch, indices) on the device for each batch of indices. Loader workers seed their RNGs with
        mix_seed(seed, start + k) before loading the k-th batch (batch `start + k` of an epoch, for a resume).
        One pass at a time: a pass started before the previous one is exhausted abandons it."""
        if self.in_memory:
            for idx in index_batches:
                yield self.gather(idx), idx
            return
        self.pass_count += 1
        this_pass = self.pass_count
        self.passes.batches = [
            (mix_seed(seed, start + k), idx.tolist()) for k, idx in enumerate(index_batches)
        ]
        try:
            for batch, idx in self._loader():
                yield to_device(batch, self.device, non_blocking=True), idx.to(self.device, non_blocking=True)
                if self.pass_count != this_pass:  # the loader's one iterator now serves the newer pass
                    raise RuntimeError("a Source's pass was resumed after a newer pass had started")
        except UserError as exc:
            # A worker's UserError (an unreadable image, say) arrives wrapped in the worker's traceback text;
            # the user needs only its message.
            text = str(exc)
            if "Original Traceback" in text:
                text = text.rsplit("UserError: ", 1)[-1].strip()
            raise UserError(text) from None

    def _loader(self) -> DataLoader:
        """The one DataLoader of this source. Its workers persist from pass to pass: starting 2 of them anew each
        epoch (and joining them at its end) cost 0.11-0.12 s of a 0.62 s streamed mnist-mini epoch on 2 CPU cores
        (benchmarks/data_path.py), and an evaluation's workers started anew at every evaluation."""
        if self.loader is None:
            workers = self.num_workers > 0
            self.loader = DataLoader(
                self.dataset,
                batch_sampler=self.passes,
                num_workers=self.num_workers,
                collate_fn=self.collate,
                pin_memory=self.device.type == "cuda",
                prefetch_factor=self.prefetch_factor if workers else None,
                persistent_workers=self.persistent_workers and workers,
                worker_init_fn=_leave_stop_signals_to_the_main_process,
                # The loader would otherwise draw its workers' base seed from the global RNG at each pass (an
                # epoch, a resume, an evaluation) and shift the stream dropout and friends draw from. (Workers
                # reseed for every batch anyway: see _Indexed.__getitems__.)
                generator=torch.Generator().manual_seed(0),
            )
        return self.loader


class TrainData:
    """The training batches of one process, epoch by epoch, from any batch on. With a transform, batches are
    (images, labels) and the images are augmented and normalised on the device."""

    def __init__(
        self, source: Source, plan: TrainPlan, transform: DeviceTransform | None, seed: int, shuffle: bool
    ):
        self.source, self.plan, self.transform = source, plan, transform
        self.seed, self.shuffle = seed, shuffle

    def __len__(self) -> int:
        return self.plan.batches_per_epoch

    def epoch(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        n = self.plan.num_samples
        order = epoch_order(n, self.seed, epoch, self.shuffle).to(self.source.index_device)
        params = self.transform.epoch_params(n, epoch) if self.transform is not None else None
        index_batches = (self.plan.rank_slice(order, b) for b in range(start, len(self)))
        # The rank too: each process's share of a global batch gets its own random stream in loader workers.
        seed = mix_seed(self.seed, epoch, self.plan.rank)
        for batch, idx in self.source.batches(index_batches, seed, start):
            if self.transform is None:
                yield batch
            else:
                images, labels = batch
                yield self.transform.train(images, idx, params), labels


class EvalData:
    """This process's share of the evaluation set: every sample exactly once across processes, no padding."""

    def __init__(
        self, source: Source, batch_size: int, world: int, rank: int, transform: DeviceTransform | None
    ):
        self.source, self.transform = source, transform
        self.indices = torch.arange(source.num_samples)[rank::world].to(source.index_device)
        self.batch_size, self.world = batch_size, world

    def __iter__(self) -> Iterator[Batch]:
        # A process whose share is empty (fewer samples than processes) has no batch at all: an empty index
        # batch would reach the DataLoader's collate function, which cannot stack nothing.
        batches = self.indices.split(self.batch_size) if len(self.indices) else ()
        for batch, _ in self.source.batches(batches):
            yield self._normalised(batch)

    def num_batches(self) -> int:
        """This process's batches."""
        return math.ceil(len(self.indices) / self.batch_size)

    def most_batches(self) -> int:
        """The batches of the process with the largest share (rank 0's)."""
        largest_share = math.ceil(self.source.num_samples / self.world)
        return math.ceil(largest_share / self.batch_size)

    def _normalised(self, batch: Batch) -> Batch:
        if self.transform is None:
            return batch
        images, labels = batch
        return self.transform.normalize(images), labels

    def first(self, n: int = 1) -> Batch:
        """The batch of the first n evaluation samples of the whole set (the same on every process), as the
        model sees them (e.g. to count FLOPs)."""
        indices = torch.arange(min(n, self.source.num_samples)).to(self.source.index_device)
        batch, _ = next(self.source.batches([indices]))
        return self._normalised(batch)
