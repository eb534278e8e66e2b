"""Benchmark 3: samples/s of the in-memory data path against the DataLoader path with 0, 1 and 2 workers, and of
workers that persist from epoch to epoch (the launcher's default) against workers started anew every epoch.

Each round builds each path afresh and runs several epochs of mnist-mini training batches (batch 128, shuffled,
normalised, random crop with padding 2 as in recipes/mnist.py), delivered to the (CPU) device; no model. The
first epoch includes starting the workers; with persistent workers the later ones do not. Alternating rounds,
medians.

    python -m benchmarks.data_path [--rounds 5] [--epochs 3]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from torchvision.datasets import MNIST

from benchmarks.common import MNIST_MINI, alternate, command, machine, median, table
from launcher.config import DataConfig
from launcher.data import DeviceTransform, Source, TrainData, TrainPlan

CPU = torch.device("cpu")


def epoch_times(
    dataset: MNIST, in_memory: bool, workers: int, persistent: bool, epochs: int
) -> list[list[float]]:
    """Seconds per epoch for `epochs` epochs of a path built afresh (so its workers start in the first one)."""
    cfg = DataConfig(mean=(0.1307,), std=(0.3081,), crop_padding=2)
    source = Source(dataset, in_memory, CPU, workers, persistent_workers=persistent)
    data = TrainData(source, TrainPlan(len(dataset), 128, 1, 0, True), DeviceTransform(cfg, 0, CPU), 0, True)
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        for _ in data.epoch(epoch):
            pass
        times.append(time.perf_counter() - start)
    return [times]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    dataset = MNIST(MNIST_MINI, train=True)
    samples = len(dataset) // 128 * 128
    paths = {"in-memory": (True, 0, False), "DataLoader, 0 workers": (False, 0, False)}
    for workers in (1, 2):
        paths[f"DataLoader, {workers} workers, started every epoch"] = (False, workers, False)
        paths[f"DataLoader, {workers} workers, persistent"] = (False, workers, True)
    runs = {name: partial(epoch_times, dataset, *path, args.epochs) for name, path in paths.items()}
    for run in runs.values():
        run()  # warm-up
    pooled = alternate(args.rounds, runs)

    def rate(name: str) -> float:  # samples/s over all the epochs of a round, median over rounds
        return median(args.epochs * samples / sum(times) for times in pooled[name])

    def ms(name: str, first: bool) -> str:
        epochs = [t * 1e3 for times in pooled[name] for t in (times[:1] if first else times[1:])]
        return f"{median(epochs):,.0f}" if epochs else "-"

    ours = rate("in-memory")
    print(f"machine: {machine()}\ncommand: {command()}\n")
    print(f"{args.epochs} epochs of {samples:,} samples per round, {args.rounds} rounds:\n")
    rows = [
        (name, f"{rate(name):,.0f}", ms(name, True), ms(name, False), f"{ours / rate(name):.1f}x faster")
        for name in runs
        if name != "in-memory"
    ]
    rows.insert(0, ("in-memory", f"{ours:,.0f}", ms("in-memory", True), ms("in-memory", False), "-"))
    header = ("path", "samples/s", "epoch 1 (ms)", "later epochs (ms each)", "in-memory vs it")
    print(table(rows, header) + "\n")
    rows = [
        (f"samples/s over {args.epochs} epochs, {workers} workers (persistent vs started every epoch)",
         f"{rate(f'DataLoader, {workers} workers, started every epoch'):,.0f}",
         f"{rate(f'DataLoader, {workers} workers, persistent'):,.0f}",
         f"{rate(f'DataLoader, {workers} workers, persistent') / rate(f'DataLoader, {workers} workers, started every epoch'):.2f}x")
        for workers in (1, 2)
    ]  # fmt: skip
    print(table(rows, ("metric", "started every epoch", "persistent (launcher)", "ratio")))


if __name__ == "__main__":
    main()
