"""The data path: every sample once per epoch on any number of processes, the in-memory path equal to the
DataLoader path (augmentation included), mid-epoch starts equal to the tail of a full epoch."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch.utils.data import Dataset
from torchvision.datasets import MNIST

from launcher.config import DataConfig
from launcher.data import DeviceTransform, EvalData, Source, TrainData, TrainPlan

CPU = torch.device("cpu")


class IndexImages(Dataset):
    """Image i is a 1x2x2 uint8 image spelling i in base 256, so a batch tells which samples it holds."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        digits = [(i >> (8 * k)) & 255 for k in range(4)]
        return torch.tensor(digits, dtype=torch.uint8).view(1, 2, 2), i % 10


def decode(images: torch.Tensor) -> list[int]:
    raw = (images * 255).round().long().view(len(images), 4)
    return (raw * torch.tensor([1, 256, 65536, 16777216])).sum(1).tolist()


def epoch_samples(
    n, batch, world, drop_last, in_memory, epoch=0, start=0, workers=0
) -> list[list[list[int]]]:
    """Per rank, the list of batches (sample ids) of one epoch."""
    dataset = IndexImages(n)
    ranks = []
    for rank in range(world):
        plan = TrainPlan(n, batch, world, rank, drop_last)
        data = TrainData(
            Source(dataset, in_memory, CPU, workers),
            plan,
            DeviceTransform(DataConfig(), 0, CPU),
            0,
            shuffle=True,
        )
        ranks.append([decode(x) for x, _ in data.epoch(epoch, start)])
    return ranks


@pytest.mark.parametrize("in_memory", [True, False])
@pytest.mark.parametrize(
    ("n", "batch", "world", "drop_last"),
    [(8000, 32, 1, True), (8000, 32, 2, True), (1000, 48, 2, False), (1001, 10, 3, False)],
)
def test_every_sample_exactly_once_per_epoch(n, batch, world, drop_last, in_memory):
    ranks = epoch_samples(n, batch, world, drop_last, in_memory)
    assert len({len(r) for r in ranks}) == 1  # every process runs the same number of steps (DDP needs it)
    seen = [i for r in ranks for b in r for i in b]
    assert sorted(seen) == list(range(n))


def test_drop_last_drops_only_the_incomplete_global_batch_and_reshuffles():
    epoch0 = [i for r in epoch_samples(1000, 48, 2, True, True) for b in r for i in b]
    epoch1 = [i for r in epoch_samples(1000, 48, 2, True, True, epoch=1) for b in r for i in b]
    assert len(epoch0) == len(set(epoch0)) == 960 and len(epoch1) == 960
    assert set(range(1000)) - set(epoch0) != set(range(1000)) - set(epoch1)  # a different 40 each epoch


def test_two_processes_see_the_global_batches_of_one_process():
    one = epoch_samples(8000, 64, 1, True, True)[0]
    two = epoch_samples(8000, 32, 2, True, True)
    for b, batch in enumerate(one):
        assert sorted(batch) == sorted(two[0][b] + two[1][b])


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_mid_epoch_start_continues_with_the_next_batch(in_memory):
    full = epoch_samples(3000, 16, 2, True, in_memory, epoch=3)
    tail = epoch_samples(3000, 16, 2, True, in_memory, epoch=3, start=37)
    assert [r[37:] for r in full] == tail


def test_in_memory_equals_the_dataloader_path_on_real_digits_with_augmentation(mnist_root):
    """Same images, same order, same random crops and flips, for 0 and 2 loader workers."""
    dataset = MNIST(mnist_root, train=True)
    cfg = DataConfig(mean=(0.1307,), std=(0.3081,), crop_padding=4, hflip=True)
    plan = TrainPlan(len(dataset), 256, 2, 1, True)

    def batches(in_memory: bool, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        source = Source(dataset, in_memory, CPU, workers)
        data = TrainData(source, plan, DeviceTransform(cfg, 7, CPU), 7, shuffle=True)
        return list(data.epoch(2, start=5))

    memory = batches(True, 0)
    assert len(memory) == len(dataset) // 512 - 5
    for workers in (0, 2):
        loader = batches(False, workers)
        assert len(loader) == len(memory)
        for (xm, ym), (xl, yl) in zip(memory, loader, strict=True):
            assert torch.equal(xm, xl) and torch.equal(ym, yl)
    x = memory[0][0]
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
    assert abs(x.mean().item()) < 0.3 and 0.7 < x.std().item() < 1.3  # normalised


def test_augmentation_depends_on_the_sample_and_epoch_only():
    """The same sample gets the same crop and flip in any batch, process or resume; another epoch differs."""
    transform = DeviceTransform(DataConfig(crop_padding=3, hflip=True), 0, CPU)
    images = torch.arange(20 * 8 * 8, dtype=torch.float32).view(20, 1, 8, 8)
    idx = torch.tensor([4, 9, 13])
    p0 = transform.epoch_params(20, epoch=0)
    alone = transform.train(images[[9]], idx[[1]], p0)
    together = transform.train(images[idx], idx, p0)
    assert torch.equal(alone[0], together[1])
    p1 = transform.epoch_params(20, epoch=1)
    assert not torch.equal(transform.train(images[idx], idx, p1), together)
    # A crop is a shifted window of the zero-padded image: every pixel is either an original pixel or zero.
    offsets, flips = p0
    dy, dx = offsets[9].tolist()
    padded = torch.nn.functional.pad(images[9], (3, 3, 3, 3))
    window = padded[:, dy : dy + 8, dx : dx + 8]
    expected = window.flip(2) if flips[9] else window
    assert torch.equal(alone[0], expected)  # float images are taken as they are (uint8 ones are scaled)


def test_evaluation_shards_cover_every_sample_once():
    dataset = IndexImages(1001)
    seen = []
    for rank in range(3):
        data = EvalData(Source(dataset, True, CPU, 0), 100, 3, rank, DeviceTransform(DataConfig(), 0, CPU))
        seen += [i for x, _ in data for i in decode(x)]
    assert sorted(seen) == list(range(1001))


class Unreadable(IndexImages):
    def __getitem__(self, i: int):
        if i == 7:
            from launcher.errors import UserError

            raise UserError("cannot read image /data/7.png (truncated)")
        return super().__getitem__(i)


def test_a_workers_user_error_reaches_the_user_as_its_message_alone():
    from launcher.errors import UserError

    source = Source(Unreadable(20), False, CPU, 1)
    with pytest.raises(UserError) as exc:
        list(source.batches([torch.arange(10)]))
    assert str(exc.value) == "cannot read image /data/7.png (truncated)"


class RandomItems(Dataset):
    """Item i is (i, a random draw of the process that loads it, as a random transform would make, that process's
    id): which sample, what was drawn for it, and by which process."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return i, torch.randint(2**31, ()).item(), os.getpid()


def streamed(source: Source, plan: TrainPlan, passes: list[tuple[int, int]]) -> list[list[list[list[int]]]]:
    """For each (epoch, start), the batches as [sample ids, draws, process ids] that source loads."""
    data = TrainData(source, plan, None, 0, shuffle=True)
    return [[[t.tolist() for t in batch] for batch in data.epoch(e, b)] for e, b in passes]


def test_persistent_workers_keep_the_order_and_random_draws_of_fresh_ones_at_any_resume():
    """One source that streams epochs 0 and 1 with the same 2 workers loads what a source started afresh at each
    epoch loads, and what a resume mid-epoch 1 loads, random draws in the workers included, with 1 worker too."""
    plan = TrainPlan(400, 16, 2, 1, True)

    def source(workers: int, persistent: bool = True) -> Source:
        return Source(RandomItems(400), False, CPU, workers, images=False, persistent_workers=persistent)

    def drawn(passes: list[list[list[list[int]]]]) -> list[list[list[int]]]:
        return [[batch[:2] for batch in epoch] for epoch in passes]  # not the process ids

    uninterrupted = drawn(streamed(source(2), plan, [(0, 0), (1, 0)]))
    for workers, persistent in ((2, False), (1, True)):
        fresh = [drawn(streamed(source(workers, persistent), plan, [(e, 0)]))[0] for e in (0, 1)]
        assert fresh == uninterrupted
    assert drawn(streamed(source(2), plan, [(1, 5)]))[0] == uninterrupted[1][5:]
    in_memory = streamed(Source(RandomItems(400), True, CPU, 0, images=False), plan, [(0, 0), (1, 0)])
    ids = [[batch[0] for batch in epoch] for epoch in uninterrupted]
    assert ids == [[batch[0] for batch in epoch] for epoch in in_memory]  # the same samples in the same order
    draws = [d for epoch in uninterrupted for batch in epoch for d in batch[1]]
    assert len(set(draws)) > 0.99 * len(draws)  # every batch draws anew: no stream repeats


def test_persistent_workers_serve_every_epoch():
    def pids(workers: int, persistent: bool = True) -> set[int]:
        source = Source(RandomItems(64), False, CPU, workers, images=False, persistent_workers=persistent)
        passes = streamed(source, TrainPlan(64, 16, 1, 0, True), [(0, 0), (1, 0), (2, 0)])
        return {pid for epoch in passes for batch in epoch for pid in batch[2]}

    assert len(pids(2)) == 2  # the same 2 workers for 3 epochs
    assert len(pids(2, persistent=False)) == 6
    assert pids(0) == {os.getpid()}


def test_evaluation_after_an_abandoned_pass_is_exact():
    """first() takes one batch and abandons the pass (the workers have more prefetched): evaluations after it
    still see every sample once."""
    source = Source(IndexImages(250), False, CPU, 2, prefetch_factor=3)
    data = EvalData(source, 20, 1, 0, DeviceTransform(DataConfig(), 0, CPU))
    assert decode(data.first(3)[0]) == [0, 1, 2]
    for _ in range(2):
        assert [i for x, _ in data for i in decode(x)] == list(range(250))


def test_a_pass_cannot_resume_after_a_newer_one_started():
    source = Source(IndexImages(100), False, CPU, 1)
    older = source.batches(torch.arange(100).split(10))
    next(older)
    assert len(list(source.batches(torch.arange(100).split(25)))) == 4
    with pytest.raises(RuntimeError, match="after a newer pass had started"):
        next(older)


def test_prefetch_factor_must_be_positive():
    from launcher.errors import UserError

    with pytest.raises(UserError, match=r"--data\.prefetch-factor must be at least 1, got 0"):
        Source(IndexImages(10), False, CPU, 2, prefetch_factor=0)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_loader_workers_leave_stop_signals_to_the_main_process(sig):
    """SLURM sends its warning signal (USR1) to every process of the job step, loader workers included, and a
    terminal sends Ctrl-C to the whole process group. Workers that persist from setup on, forked before the
    training loop routes these signals to its stop flag, would die of them; they ignore them instead."""
    source = Source(RandomItems(64), False, CPU, 2, images=False)
    plan = TrainPlan(64, 16, 1, 0, True)
    before = {pid for batch in streamed(source, plan, [(0, 0)])[0] for pid in batch[2]}
    for pid in before:
        os.kill(pid, sig)
    time.sleep(0.5)  # a killed worker would be noticed by then (the loader checks on SIGCHLD)
    after = {pid for batch in streamed(source, plan, [(1, 0)])[0] for pid in batch[2]}
    assert after == before and len(before) == 2
