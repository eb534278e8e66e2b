"""Benchmark 3: samples/s of the in-memory data path against the DataLoader path with 0, 1 and 2 workers.

One epoch of mnist-mini training batches (batch 128, shuffled, normalised, random crop with padding 2 as in
recipes/mnist.py), delivered to the (CPU) device; no model. Alternating rounds, medians.

    python -m benchmarks.data_path [--rounds 5]
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


def epoch_rate(data: TrainData, epoch: list[int]) -> list[float]:
    epoch[0] += 1
    start = time.perf_counter()
    samples = sum(len(y) for _, y in data.epoch(epoch[0]))
    return [samples / (time.perf_counter() - start)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    dataset = MNIST(MNIST_MINI, train=True)
    cfg = DataConfig(mean=(0.1307,), std=(0.3081,), crop_padding=2)
    plan = TrainPlan(len(dataset), 128, 1, 0, True)
    transform = DeviceTransform(cfg, 0, CPU)
    paths = {"in-memory": TrainData(Source(dataset, True, CPU, 0), plan, transform, 0, True)}
    for workers in (0, 1, 2):
        paths[f"DataLoader, {workers} workers"] = TrainData(
            Source(dataset, False, CPU, workers), plan, transform, 0, True
        )
    runs = {name: partial(epoch_rate, data, [0]) for name, data in paths.items()}
    for run in runs.values():
        run()  # warm-up
    pooled = alternate(args.rounds, runs)
    ours = median(pooled["in-memory"])
    rows = [
        (f"samples/s, mnist-mini epoch, batch 128 ({name} vs in-memory)", f"{median(pooled[name]):,.0f}",
         f"{ours:,.0f}", f"{ours / median(pooled[name]):.1f}x faster")
        for name in runs if name != "in-memory"
    ]  # fmt: skip
    print(f"machine: {machine()}\ncommand: {command()}\n")
    print(table(rows, ("metric", "baseline", "launcher in-memory", "ratio")))


if __name__ == "__main__":
    main()
