"""Benchmark 1: the launcher's training loop against a plain PyTorch loop, same process, alternating.

Same model initialisation, data tensors (mnist-mini held in memory), batch, sample order, SGD with momentum,
number of steps; fp32; one process. Step times are medians over 50-step intervals after the first (warm-up)
interval: for the launcher they come from its own metrics.jsonl (samples/s, which leaves out evaluation and
checkpoint time), for the plain loop from the same interval timing. Also checks the final weights are identical.

    python -m benchmarks.loop_overhead [--steps 400] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import load_file
from torch import nn
from torchvision.datasets import MNIST

from benchmarks.common import MNIST_MINI, PlainLoop, alternate, command, machine, median, table
from launcher.config import (
    CheckpointConfig,
    DataConfig,
    LoggingConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from launcher.data import epoch_order, to_tensors
from launcher.recipe import Datasets, Recipe
from launcher.train import run

LOG_EVERY = 50
MEAN, STD = 0.1307, 0.3081


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )  # fmt: skip


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def config(out: Path, name: str, steps: int, batch: int, seed: int) -> TrainConfig:
    return TrainConfig(
        output_dir=out, run_name=name, resume="none", seed=seed, max_steps=steps, eval_every_epochs=0,
        data=DataConfig(batch_size=batch, mean=(MEAN,), std=(STD,), in_memory=True),
        optim=OptimConfig(name="sgd", lr=0.01, momentum=0.9),
        schedule=ScheduleConfig(decay="constant"),
        checkpoint=CheckpointConfig(every_epochs=0, keep_last=1),
        logging=LoggingConfig(every_steps=LOG_EVERY, progress_bar=False),
    )  # fmt: skip


def launcher_run(
    build: Callable[[], nn.Module], data: Datasets, cfg: TrainConfig, result: dict
) -> list[float]:
    recipe = Recipe("bench", Path(__file__), cfg, lambda _: build(), lambda _: data)
    out = run(dataclasses.replace(cfg, run_name=f"{cfg.run_name}-{time.monotonic_ns()}"), recipe)
    run_dir = Path(out["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last_start = max(
        i for i, r in enumerate(records) if r["kind"] == "setup"
    )  # the run dir is reused per round
    sps = [r["samples_per_s"] for r in records[last_start:] if r["kind"] == "train"]
    result["weights"] = load_file(next((run_dir / "checkpoints").glob("step-*")) / "model.safetensors")
    return [cfg.data.batch_size / s for s in sps[1:]]  # seconds per step, first interval is warm-up


def plain_run(
    build: Callable[[], nn.Module],
    data: Datasets,
    cfg: TrainConfig,
    result: dict,
    loop: PlainLoop | None = None,
) -> list[float]:
    """What a careful user writes by hand: tensors in memory, no per-step sync, no logging. `loop` says on which
    device, in which precision, and whether through Accelerate's wrappers (benchmarks/gpu.py); by default CPU, fp32,
    plain PyTorch."""
    loop = loop or PlainLoop()
    set_seed(cfg.seed)
    model = build().to(loop.device)
    set_seed(cfg.seed)  # as the launcher re-seeds after building: dropout draws the same masks
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    model, opt, backward, _ = loop.prepare(model, opt)
    images, labels = (t.to(loop.device) for t in to_tensors(data.train))
    n, batch, every = len(labels), cfg.data.batch_size, cfg.logging.every_steps
    mean = torch.tensor(MEAN, device=loop.device).view(1, -1, 1, 1)
    inv_std = 1.0 / torch.tensor(STD, device=loop.device).view(1, -1, 1, 1)
    times, step, epoch = [], 0, 0
    start = time.perf_counter()
    while step < cfg.max_steps:
        order = epoch_order(n, cfg.seed, epoch, shuffle=True).to(loop.device)
        for b in range(n // batch):
            idx = order[b * batch : (b + 1) * batch]
            x = images[idx].float().div_(255.0).sub_(mean).mul_(inv_std)
            with loop.autocast():
                out = model(x)
            loss = F.cross_entropy(out.float(), labels[idx])
            backward(loss)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if step % every == 0:
                loop.sync()
                now = time.perf_counter()
                times.append((now - start) / every)
                start = now
            if step == cfg.max_steps:
                break
        epoch += 1
    loop.finish()
    result["weights"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier timings on a shared VM)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = Datasets(train=MNIST(MNIST_MINI, train=True), eval=MNIST(MNIST_MINI, train=False))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in (("small CNN", small_cnn), ("tiny MLP", tiny_mlp)):
            results: dict[str, dict] = {"launcher": {}, "no-tb": {}, "plain": {}}
            cfg = config(Path(tmp), name.replace(" ", "-"), args.steps, args.batch, seed=0)
            quiet = dataclasses.replace(cfg, run_name=cfg.run_name + "-no-tb",
                                        logging=dataclasses.replace(cfg.logging, lr_every_step=False))  # fmt: skip
            pooled = alternate(args.rounds, {
                "plain": partial(plain_run, build, data, cfg, results["plain"]),
                "launcher": partial(launcher_run, build, data, cfg, results["launcher"]),
                "no-tb": partial(launcher_run, build, data, quiet, results["no-tb"]),
            })  # fmt: skip
            base = median(pooled["plain"])
            for variant, label in (("launcher", "defaults"), ("no-tb", "--logging.no-lr-every-step")):
                ours = median(pooled[variant])
                weights = results[variant]["weights"]
                same = all(torch.equal(results["plain"]["weights"][k], v) for k, v in weights.items())
                rows.append((f"step time, {name}, batch {args.batch}, launcher {label}", f"{base * 1e3:.3f} ms",
                             f"{ours * 1e3:.3f} ms", f"{ours / base:.3f}", "identical" if same else "DIFFERENT"))  # fmt: skip
    print(f"machine: {machine()}\ncommand: {command()}\n")
    print(table(rows, ("metric", "plain PyTorch", "launcher", "ratio", "final weights")))


if __name__ == "__main__":
    main()
