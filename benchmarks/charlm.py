"""Benchmark 9: the char-LM recipe. Its step time against a plain PyTorch loop of the same model, and its anchor run.

Step time (default): recipes/charlm.py's GPT, data (tiny-shakespeare windows), sample order, AdamW with the same
parameter groups, schedule and clipping, in the same process, alternating rounds; one torch thread; fp32. The
launcher's step time comes from its own metrics.jsonl (samples/s over 50-step intervals, evaluation and
checkpoints left out), the plain loop's from the same interval timing; the first interval is warm-up.

Anchor (--anchor): the recipe's defaults as a user runs them (2,000 steps), timed as a whole command, with the
validation loss it reaches; nanoGPT reports 1.88 for this configuration.

    python -m benchmarks.charlm [--steps 300] [--rounds 3] [--threads 1]
    python -m benchmarks.charlm --anchor
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from safetensors.torch import load_file

from benchmarks.common import REPO, PlainLoop, alternate, command, machine, median, table
from launcher.data import epoch_order
from launcher.recipe import load_recipe, parse_config
from launcher.schedules import lr_multiplier, schedule_steps
from launcher.train import run

TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
RECIPE = REPO / "recipes" / "charlm.py"
LOG_EVERY = 50


def launcher_run(recipe, cfg, result: dict) -> list[float]:
    out = run(dataclasses.replace(cfg, run_name=f"{cfg.run_name}-{time.monotonic_ns()}"), recipe)
    run_dir = Path(out["run_dir"])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    sps = [r["samples_per_s"] for r in records if r["kind"] == "train"]
    result["weights"] = load_file(next((run_dir / "checkpoints").glob("step-*")) / "model.safetensors")
    return [cfg.data.batch_size / s for s in sps[1:]]


def plain_run(recipe, cfg, result: dict, loop: PlainLoop | None = None) -> list[float]:
    """The same training written by hand: windows gathered in memory, mean loss, no per-step sync, no logging.
    `loop` says on which device, in which precision, and whether through Accelerate's wrappers
    (benchmarks/gpu.py); by default CPU, fp32, plain PyTorch."""
    loop = loop or PlainLoop()
    set_seed(cfg.seed)
    model = recipe.make_model(cfg).to(loop.device)
    task = recipe.make_task(cfg)
    windows = recipe.make_datasets(cfg).train.to(loop.device)
    set_seed(cfg.seed)  # as the launcher re-seeds after building: dropout draws the same masks
    optimizer = torch.optim.AdamW(
        task.param_groups(model, cfg.optim), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps
    )
    steps = schedule_steps(cfg.schedule, 1, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, steps, cfg.schedule))
    model, optimizer, backward, clip_grad_norm_ = loop.prepare(model, optimizer)
    order = epoch_order(len(windows), cfg.seed, 0, shuffle=True).to(loop.device)
    batch, every, times = cfg.data.batch_size, cfg.logging.every_steps, []
    model.train()
    start = time.perf_counter()
    for step in range(cfg.max_steps):
        x, y = windows.gather(order[step * batch : (step + 1) * batch])
        with loop.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        backward(loss)
        clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if (step + 1) % every == 0:
            loop.sync()
            now = time.perf_counter()
            times.append((now - start) / every)
            start = now
    loop.finish()
    result["weights"] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return times[1:]


def step_time(args: argparse.Namespace) -> None:
    recipe = load_recipe(RECIPE)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        argv = ["--data.path", str(TEXT), "--output-dir", tmp, "--run-name", "bench", "--resume", "none",
                "--max-steps", str(args.steps), "--eval-every-steps", "0", "--checkpoint.every-steps", "0",
                "--logging.every-steps", str(LOG_EVERY), "--logging.no-progress-bar"]  # fmt: skip
        cfg = parse_config(recipe, argv, prog="bench")
        results: dict[str, dict] = {"launcher": {}, "plain": {}}
        pooled = alternate(args.rounds, {
            "plain": partial(plain_run, recipe, cfg, results["plain"]),
            "launcher": partial(launcher_run, recipe, cfg, results["launcher"]),
        })  # fmt: skip
        base, ours = median(pooled["plain"]), median(pooled["launcher"])
        plain_w, ours_w = results["plain"]["weights"], results["launcher"]["weights"]
        diff = max((plain_w[k] - ours_w[k]).abs().max().item() for k in ours_w)
        rows.append((f"step time, charlm defaults, batch {cfg.data.batch_size}x{cfg.data.block_size}",
                     f"{base * 1e3:.2f} ms", f"{ours * 1e3:.2f} ms", f"{ours / base:.3f}", f"{diff:.1e}"))  # fmt: skip
    print(f"machine: {machine()}\ncommand: {command()}\n")
    print(table(rows, ("metric", "plain PyTorch", "launcher", "ratio", "max weight difference")))


def anchor() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "launcher.train", str(RECIPE), "--data.path", str(TEXT), "--output-dir", tmp,
               "--run-name", "anchor", "--logging.no-progress-bar"]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        records = [
            json.loads(line) for line in (Path(tmp) / "anchor" / "metrics.jsonl").read_text().splitlines()
        ]
        final = next(r for r in records if r["kind"] == "final")
        train_time = sum(12 * 50 / r["samples_per_s"] for r in records if r["kind"] == "train")
    loss, bpc = f"{final['loss']:.4f}", f"{final['bits_per_char']:.3f}"
    row = ("charlm defaults, 2,000 steps", loss, bpc, f"{wall:.0f} s", f"{train_time:.0f} s", "1.88")
    print(f"machine: {machine()}\ncommand: {command()}\n")
    print(table([row], ("run", "validation loss", "bits/char", "whole command", "training steps", "nanoGPT")))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared VM)")
    parser.add_argument("--anchor", action="store_true", help="the full default run instead of step times")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.anchor:
        anchor()
    else:
        step_time(args)


if __name__ == "__main__":
    main()
