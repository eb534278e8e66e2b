"""Benchmark 2: the launcher against the seed templates' style of loop, on mnist-mini.

The seeds' loop: torchvision MNIST with ToTensor + Normalize per sample, a shuffling DataLoader (2 workers),
`loss.item()` every step and a tqdm progress bar updated every step. The launcher: recipes/mnist.py's model and
optimizer with its default data path (in memory, on the device). Same model, batch, optimizer and number of
steps; samples/s over the training steps (the launcher's from its metrics.jsonl, which leaves out evaluation and
checkpoints; the seeds' loop does neither). Alternating rounds, medians.

    python -m benchmarks.seed_style [--steps 250] [--rounds 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from torchvision import transforms
from torchvision.datasets import MNIST
from tqdm import tqdm

from benchmarks.common import MNIST_MINI, REPO, alternate, command, machine, median, table
from launcher.recipe import load_recipe
from launcher.train import run

RECIPE = REPO / "recipes" / "mnist.py"


def seed_style(steps: int, batch: int) -> list[float]:
    recipe = load_recipe(RECIPE)
    cfg = recipe.default
    set_seed(0)
    model = recipe.build_model(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    loader = DataLoader(
        MNIST(MNIST_MINI, train=True, transform=tf), batch_size=batch, shuffle=True, num_workers=2
    )
    model.train()
    done, start = 0, time.perf_counter()
    with tqdm(total=steps, desc="seed-style", mininterval=0) as bar:
        while done < steps:
            for x, y in loader:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.set_postfix(loss=f"{loss.item():.4f}")
                bar.update(1)
                done += 1
                if done == steps:
                    break
    return [steps * batch / (time.perf_counter() - start)]


def launcher(steps: int, batch: int, out: Path) -> list[float]:
    recipe = load_recipe(RECIPE)
    cfg = dataclasses.replace(
        recipe.default, output_dir=out, run_name=f"bench-{time.monotonic_ns()}", max_steps=steps, eval_every_epochs=0,
        data=dataclasses.replace(recipe.default.data, root=MNIST_MINI, batch_size=batch),
        checkpoint=dataclasses.replace(recipe.default.checkpoint, every_epochs=0),
    )  # fmt: skip
    start = time.perf_counter()
    result = run(cfg, recipe)
    wall = time.perf_counter() - start
    records = [
        json.loads(line) for line in (Path(result["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    ]
    last = max(i for i, r in enumerate(records) if r["kind"] == "setup")
    train = [r for r in records[last:] if r["kind"] == "train"]
    # Whole-run samples/s too (start-up, final evaluation and checkpoint included), for honesty.
    return [median(r["samples_per_s"] for r in train), steps * batch / wall]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    batch = 64
    with tempfile.TemporaryDirectory() as tmp:
        pooled = alternate(args.rounds, {
            "seeds": partial(seed_style, args.steps, batch),
            "launcher": partial(launcher, args.steps, batch, Path(tmp)),
        })  # fmt: skip
    seeds = median(pooled["seeds"])
    loop, whole = median(pooled["launcher"][0::2]), median(pooled["launcher"][1::2])
    rows = [
        (f"samples/s, training steps, batch {batch}", f"{seeds:,.0f}", f"{loop:,.0f}", f"{loop / seeds:.2f}"),
        (f"samples/s, whole run incl. start-up, batch {batch}", f"{seeds:,.0f}", f"{whole:,.0f}",
         f"{whole / seeds:.2f}"),
    ]  # fmt: skip
    print(f"machine: {machine()}\ncommand: {command()}\n")
    print(table(rows, ("metric", "seeds' loop", "launcher", "ratio (launcher / seeds)")))


if __name__ == "__main__":
    main()
