"""The GPU benchmark: one CUDA GPU, at most 8 minutes, one markdown table.

1. Loop overhead: the launcher's step time over a plain PyTorch loop's, same model, data, order and optimizer, in
   the same process, alternating rounds (benchmarks/loop_overhead.py and benchmarks/charlm.py on the device), for
   recipes/mnist.py's CNN and recipes/charlm.py's GPT, in fp32 and bf16. Goal: at most 1.03x. A third loop, the
   plain one through Accelerate's wrappers (`accelerator.prepare`, `accelerator.backward`, the prepared
   optimizer), measures what the launcher's bypass of those wrappers saves on this device (`_train`: ~100 us per
   step on CPU).
2. mnist-mini to 98% test accuracy (recipes/mnist.py, data in memory on the GPU, bf16): the whole command's wall
   time and the training time alone (the launcher's own samples/s, evaluation and checkpoints left out) up to the
   first evaluation at 98%. Goal: training at most 2 s.
3. Char-LM at nanoGPT's shakespeare-char GPU configuration (6 layers, 6 heads, 384 wide, 256 characters of
   context, batch 64, dropout 0.2, bf16): tokens/s and MFU (launcher/throughput.py; forward+backward = 3x the
   forward FLOPs counted at start-up), eager and with --compile, for a fixed number of steps.
4. Checkpoints of a 100.7M-parameter model with its AdamW state: the time training is blocked per save,
   synchronous against --checkpoint.async-save.

    python -m benchmarks.gpu --out gpu.md          # needs a CUDA GPU; prints each part's wall time
    python -m benchmarks.gpu --smoke --out smoke.md  # every part on CPU with tiny sizes (tests/test_benchmark_gpu.py)

The smoke mode runs the same code with tiny models and a few steps, so the suite keeps this script working
without a GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torchvision.datasets import MNIST

from benchmarks import charlm, checkpoint_io, loop_overhead
from benchmarks.common import MNIST_MINI, REPO, PlainLoop, alternate, command, machine, median, table
from launcher import checkpoint as ckpt
from launcher.recipe import Datasets, load_recipe, parse_config
from launcher.throughput import (
    format_mfu,
    peak_memory,
    peak_tflops,
    reset_peak_memory,
)
from launcher.train import run

MNIST_RECIPE = REPO / "recipes" / "mnist.py"
HEADER = ("metric", "baseline", "measured", "ratio", "goal")
Row = tuple[str, str, str, str, str]


@dataclass(frozen=True)
class Sizes:
    """What differs between the GPU run and --smoke: sizes, step counts, rounds and time budgets. Everything
    else is the same code."""

    rounds: int
    """Alternating rounds of the loop-overhead comparison (medians over all of their intervals)."""
    overhead_steps: int
    """Steps per loop-overhead run; step times are medians over `log_every`-step intervals after the first."""
    log_every: int
    mnist_batch: int
    mnist_model: dict[str, int] = field(default_factory=dict)
    """Overrides of recipes/mnist.py's model config (none: the recipe's CNN)."""
    charlm_args: tuple[str, ...] = ()
    """Overrides of recipes/charlm.py's defaults for the loop-overhead runs (none: its 0.8M-parameter GPT)."""
    target_args: tuple[str, ...] = ()
    """Flags of the mnist-mini to-98% command."""
    gpt_args: tuple[str, ...] = ()
    """Flags of the char-LM throughput runs (the model, batch and context)."""
    gpt_steps: int = 0
    ckpt_width: int = 0
    ckpt_depth: int = 0
    ckpt_repeats: int = 0
    budgets: dict[str, float] = field(default_factory=dict)
    """Seconds each part should take at most (a warning when it takes longer)."""


# recipes/mnist.py without its random crop, for 2 epochs (250 steps of 64): measured on CPU in fp32, 97.35% after
# epoch 1 and 98.70% after epoch 2 (lr 0.1: 97.75%, 98.60%). Larger batches need more epochs for as many steps
# (batch 128, lr 0.1: 97.60% after 2 epochs; 256, lr 0.2: 95.45% after 3). bf16 reaches the same accuracy as
# fp32 (benchmarks/bf16_accuracy.py). The crop helps the final accuracy, not the first epochs.
TARGET = ("--data.batch-size", "64", "--data.crop-padding", "0", "--max-epochs", "2")

# nanoGPT's config/train_shakespeare_char.py: n_layer 6, n_head 6, n_embd 384, block_size 256, batch_size 64,
# dropout 0.2, learning_rate 1e-3 (beta2 0.99, warm-up 100 steps and the weight decay are the recipe's already).
NANOGPT_GPU = "--model.layers 6 --model.heads 6 --model.width 384 --model.dropout 0.2 --data.block-size 256 "
NANOGPT_GPU += "--data.batch-size 64 --optim.lr 1e-3"
TINY_MNIST = "--model.channels 4 --model.hidden 16 --max-steps 10 --mixed-precision bf16"
TINY_GPT = "--model.layers 1 --model.heads 2 --model.width 32 --data.block-size 32 --data.batch-size 4"

GPU = Sizes(
    rounds=3,
    overhead_steps=400,
    log_every=50,
    mnist_batch=128,
    target_args=(*TARGET, "--mixed-precision", "bf16"),
    gpt_args=tuple(NANOGPT_GPU.split()),
    gpt_steps=500,
    ckpt_width=4096,  # 6 x Linear(4096, 4096): 100.7M parameters, 1.2 GB with AdamW's two moments
    ckpt_depth=6,
    ckpt_repeats=3,
    budgets={"overhead": 180, "mnist": 60, "charlm": 150, "checkpoint": 60, "total": 480},
)

SMOKE = Sizes(
    rounds=1,
    overhead_steps=15,
    log_every=5,
    mnist_batch=32,
    mnist_model={"channels": 4, "hidden": 16},
    charlm_args=tuple(TINY_GPT.split()),
    target_args=tuple(TINY_MNIST.split()),
    gpt_args=(*TINY_GPT.split(), "--model.dropout", "0.2"),
    gpt_steps=15,
    ckpt_width=256,
    ckpt_depth=2,
    ckpt_repeats=2,
    budgets={"overhead": 30, "mnist": 20, "charlm": 45, "checkpoint": 10, "total": 90},
)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms"


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].float() - b[k].float()).abs().max().item() for k in b)


# ---- 1. loop overhead --------------------------------------------------------------------------------------------
def overhead_rows(
    name: str, precision: str, rounds: int, runs: dict[str, Callable[[dict], list[float]]]
) -> list[Row]:
    """Alternate the plain loop, the plain loop through Accelerate's wrappers and the launcher; two rows."""
    results: dict[str, dict] = {variant: {} for variant in runs}
    pooled = alternate(rounds, {variant: partial(fn, results[variant]) for variant, fn in runs.items()})
    base = median(pooled["plain"])
    rows = []
    for variant, label, goal in (
        ("launcher", "launcher", "≤ 1.03"),
        ("accelerate", "Accelerate's wrappers", ""),
    ):
        ours = median(pooled[variant])
        diff = max_difference(results["plain"]["weights"], results[variant]["weights"])
        rows.append((f"step time, {name}, {precision}: {label} / plain", f"plain {ms(base)}",
                     f"{ms(ours)} (weights {diff:.1e} apart)", f"{ours / base:.3f}", goal))  # fmt: skip
    return rows


def overhead(sizes: Sizes, device: torch.device, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    mnist = load_recipe(MNIST_RECIPE)
    mnist_cfg = dataclasses.replace(
        mnist.default, model=dataclasses.replace(mnist.default.model, **sizes.mnist_model)
    )
    build = partial(mnist.make_model, mnist_cfg)
    data = Datasets(train=MNIST(MNIST_MINI, train=True), eval=MNIST(MNIST_MINI, train=False))
    lm = load_recipe(charlm.RECIPE)
    for precision in ("no", "bf16"):
        label = "fp32" if precision == "no" else precision
        cfg = loop_overhead.config(tmp, f"mnist-{label}", sizes.overhead_steps, sizes.mnist_batch, seed=0)
        cfg = dataclasses.replace(
            cfg,
            mixed_precision=precision,
            logging=dataclasses.replace(cfg.logging, every_steps=sizes.log_every),
        )
        rows += overhead_rows(f"mnist recipe CNN, batch {sizes.mnist_batch}", label, sizes.rounds, {
            "plain": partial(loop_overhead.plain_run, build, data, cfg, loop=PlainLoop(device, precision)),
            "accelerate": partial(loop_overhead.plain_run, build, data, cfg, loop=PlainLoop(device, precision, True)),
            "launcher": partial(loop_overhead.launcher_run, build, data, cfg),
        })  # fmt: skip
        argv = ["--data.path", str(charlm.TEXT), "--output-dir", str(tmp), "--run-name", f"charlm-{label}",
                "--resume", "none", "--max-steps", str(sizes.overhead_steps), "--eval-every-steps", "0",
                "--checkpoint.every-steps", "0", "--logging.every-steps", str(sizes.log_every),
                "--logging.no-progress-bar", "--mixed-precision", precision, *sizes.charlm_args]  # fmt: skip
        cfg = parse_config(lm, argv, prog="benchmarks.gpu")
        shape = f"batch {cfg.data.batch_size}x{cfg.data.block_size}"
        rows += overhead_rows(f"charlm recipe GPT, {shape}", label, sizes.rounds, {
            "plain": partial(charlm.plain_run, lm, cfg, loop=PlainLoop(device, precision)),
            "accelerate": partial(charlm.plain_run, lm, cfg, loop=PlainLoop(device, precision, True)),
            "launcher": partial(charlm.launcher_run, lm, cfg),
        })  # fmt: skip
    return rows


# ---- 2. mnist-mini to 98% ------------------------------------------------------------------------------------------
def records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def to_target(sizes: Sizes, tmp: Path, target: float = 0.98) -> list[Row]:
    """The recipe as a user runs it, timed as a whole command. Logging once per epoch makes every logged interval
    end where an evaluation starts, so the training time up to an evaluation is a sum of whole intervals."""
    flags = [*sizes.target_args, "--data.root", str(MNIST_MINI)]
    cfg = parse_config(load_recipe(MNIST_RECIPE), flags, prog="benchmarks.gpu")
    steps_per_epoch = len(MNIST(MNIST_MINI, train=True)) // cfg.data.batch_size
    cmd = [sys.executable, "-m", "launcher.train", str(MNIST_RECIPE), *flags, "--output-dir", str(tmp),
           "--run-name", "to-target", "--resume", "none", "--logging.no-progress-bar",
           "--logging.every-steps", str(steps_per_epoch)]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    log = records(tmp / "to-target")
    batch = next(r for r in log if r["kind"] == "setup")["global_batch"]
    trained, previous, evals = 0.0, 0, []
    for r in log:
        if r["kind"] == "train":
            trained += (r["step"] - previous) * batch / r["samples_per_s"]
            previous = r["step"]
        elif r["kind"] == "eval":
            evals.append((r["step"], r["epoch"], r["accuracy"], trained))
    reached = next((e for e in evals if e[2] >= target), None)
    step, epoch, accuracy, seconds = reached or evals[-1]
    what = "reached" if reached else "NOT reached; last"
    precision = "fp32" if cfg.mixed_precision == "no" else cfg.mixed_precision
    length = f"{cfg.max_steps} steps" if cfg.max_steps is not None else f"{cfg.max_epochs} epochs"
    setting = f"{precision}, batch {cfg.data.batch_size}, lr {cfg.optim.lr:g}, {length}"
    return [
        (f"mnist-mini to {target:.0%} test accuracy: training time ({setting})", "",
         f"{seconds:.2f} s ({what} {accuracy:.2%} at step {step}, epoch {epoch:g})", "", "≤ 2 s"),
        (f"mnist-mini to {target:.0%}: whole command, start-up to exit ({len(evals)} evaluations)", "",
         f"{wall:.1f} s", "", ""),
    ]  # fmt: skip


# ---- 3. char-LM throughput and MFU ---------------------------------------------------------------------------------
def lm_run(sizes: Sizes, device: torch.device, tmp: Path, compiled: bool) -> dict[str, Any]:
    recipe = load_recipe(charlm.RECIPE)
    name = "gpt-compiled" if compiled else "gpt-eager"
    argv = ["--data.path", str(charlm.TEXT), "--output-dir", str(tmp), "--run-name", name, "--resume", "none",
            "--max-steps", str(sizes.gpt_steps), "--eval-every-steps", "0", "--checkpoint.every-steps", "0",
            "--logging.every-steps", str(sizes.log_every), "--logging.no-progress-bar",
            "--mixed-precision", "bf16", *sizes.gpt_args, *(["--compile"] if compiled else [])]  # fmt: skip
    cfg = parse_config(recipe, argv, prog="benchmarks.gpu")
    reset_peak_memory(device)
    run(cfg, recipe)
    log = records(tmp / name)
    setup = next(r for r in log if r["kind"] == "setup")
    every = [r for r in log if r["kind"] == "train"]
    train = every[1:]  # the first interval holds the warm-up (and the compilation)
    mfus = [r["mfu"] for r in train]
    return {
        # The run's own throughput fields (launcher/progress.py): medians over its logging intervals.
        "tokens_per_s": median([r["tokens_per_s"] for r in train]),
        "tflops": median([r["tflops"] for r in train]),
        "mfu": None if None in mfus else median(mfus),
        "peak": peak_tflops(device, "bf16"),
        "memory": training_peak(every, device),
        "parameters": setup["parameters"],
        "shape": f"{cfg.model.layers} layers x {cfg.model.width}, batch {cfg.data.batch_size}x{cfg.data.block_size}",
    }


def training_peak(train: list[dict[str, Any]], device: torch.device) -> dict[str, float]:
    """The peak memory of the training steps: the largest of the run's own per-interval peaks where its records
    hold them (the launcher resets the CUDA peak at every logging step), else what this process saw."""
    names = peak_memory(device)
    if train and all(name in r for r in train for name in names):
        return {name: max(r[name] for r in train) for name in names}
    return names


def memory_text(memory: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in memory.items())


def lm_throughput(sizes: Sizes, device: torch.device, tmp: Path) -> list[Row]:
    eager = lm_run(sizes, device, tmp, compiled=False)
    compiled = lm_run(sizes, device, tmp, compiled=True)
    what = f"char-LM {eager['parameters'] / 1e6:.2f}M params, {eager['shape']}, bf16, {sizes.gpt_steps} steps"
    peak = "peak n/a" if eager["peak"] is None else f"peak {eager['peak']:g} TFLOP/s"
    rows: list[Row] = [
        (f"{what}: tokens/s, eager", "", f"{eager['tokens_per_s']:,.0f}", "", ""),
        (f"{what}: tokens/s, --compile / eager", f"eager {eager['tokens_per_s']:,.0f}",
         f"{compiled['tokens_per_s']:,.0f}", f"{compiled['tokens_per_s'] / eager['tokens_per_s']:.2f}", ""),
    ]  # fmt: skip
    for label, result in (("eager", eager), ("--compile", compiled)):
        rows.append((f"{what}: MFU, {label}", peak,
                     f"{format_mfu(result['mfu'])} ({result['tflops']:.2f} TFLOP/s)", "", ""))  # fmt: skip
    rows.append((f"{what}: peak memory (GB), --compile / eager", memory_text(eager["memory"]),
                 memory_text(compiled["memory"]), "", ""))  # fmt: skip
    return rows


# ---- 4. checkpoints ------------------------------------------------------------------------------------------------
def checkpoints(sizes: Sizes, device: torch.device, tmp: Path) -> list[Row]:
    """The launcher's Checkpointer on a model on the device, as benchmarks/checkpoint_io.py times it on CPU: the
    time `save` blocks the caller, synchronous (written, fsynced, committed) against async (copied to host
    buffers, written in the background; each round waits for the commit outside the timing)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model, optimizer = checkpoint_io.build(sizes.ckpt_width, sizes.ckpt_depth, device)
    params = sum(p.numel() for p in model.parameters())
    nbytes = sum(v.numel() * v.element_size() for v in checkpoint_io.flat_tensors(model, optimizer).values())
    accelerator = Accelerator(cpu=device.type == "cpu")
    savers = {
        "sync": ckpt.Checkpointer(tmp / "ckpt-sync", accelerator, keep_last=1, tolerate_failures=False),
        "async": ckpt.Checkpointer(
            tmp / "ckpt-async", accelerator, keep_last=1, tolerate_failures=False, async_save=True
        ),
    }
    state, meta = ckpt.TrainState(), {"fingerprint": {}, "config": {}}
    blocked: dict[str, list[float]] = {name: [] for name in savers}
    committed: dict[str, list[float]] = {name: [] for name in savers}
    for round_ in range(1 + sizes.ckpt_repeats):  # the first round warms up (buffers, page cache, CUDA)
        for name in list(savers) if round_ % 2 else reversed(list(savers)):
            state.step += 1
            start = time.perf_counter()
            savers[name].save(model, optimizer, None, state, meta)
            returned = time.perf_counter()
            savers[name].wait()
            if round_:
                blocked[name].append(returned - start)
                committed[name].append(time.perf_counter() - start)
    AcceleratorState._reset_state(reset_partial_state=False)
    sync, async_ = median(blocked["sync"]), median(blocked["async"])
    what = f"checkpoint, {params / 1e6:.1f}M params + AdamW ({nbytes / 1e9:.2f} GB)"
    return [
        (f"{what}: training blocked per save, async / sync", f"sync {sync:.3f} s", f"async {async_:.3f} s",
         f"{async_ / sync:.3f}", "async ≤ 0.33"),
        (f"{what}: save until committed, async / sync", f"sync {median(committed['sync']):.3f} s",
         f"async {median(committed['async']):.3f} s",
         f"{median(committed['async']) / median(committed['sync']):.3f}", ""),
    ]  # fmt: skip


# ---- the table -----------------------------------------------------------------------------------------------------
PARTS: dict[str, Callable[[Sizes, torch.device, Path], list[Row]]] = {
    "overhead": overhead,
    "mnist": lambda sizes, device, tmp: to_target(sizes, tmp),
    "charlm": lm_throughput,
    "checkpoint": checkpoints,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, help="also write the table (markdown) to this file")
    parser.add_argument(
        "--smoke", action="store_true", help="every part on CPU with tiny sizes (about a minute)"
    )
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS), help="run only these")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["ACCELERATE_USE_CPU"] = "1"  # the launcher's runs too, even where a GPU is present
        # One thread, here and in the subprocess: on a loaded 2-core machine two intra-op threads wait for each
        # other, and a tiny model's step takes 300 ms instead of 7. Inductor compiles in this process too.
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
        os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
        device, sizes = torch.device("cpu"), SMOKE
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda", torch.cuda.current_device()), GPU
        # As the launcher sets it (without --deterministic), for the plain loops too, whichever runs first.
        torch.backends.cudnn.benchmark = True
    else:
        print(
            "error: no CUDA GPU; `python -m benchmarks.gpu --smoke` runs every part on CPU", file=sys.stderr
        )
        return 2
    rows: list[Row] = []
    walls: list[Row] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for name in args.parts:
            part_start = time.perf_counter()
            print(f"# part {name} ...", file=sys.stderr, flush=True)
            rows += PARTS[name](sizes, device, Path(tmp) / name)
            wall, budget = time.perf_counter() - part_start, sizes.budgets[name]
            print(f"# part {name}: {wall:.1f} s (budget {budget:g} s)", file=sys.stderr, flush=True)
            walls.append((f"wall time, part {name}", f"budget {budget:g} s", f"{wall:.1f} s", f"{wall / budget:.2f}",
                          "≤ 1"))  # fmt: skip
            if args.out is not None:  # the parts so far, in case a later one runs out of the machine's time
                args.out.write_text(report(rows + walls))
    wall, budget = time.perf_counter() - start, sizes.budgets["total"]
    walls.append(
        ("wall time, all parts", f"budget {budget:g} s", f"{wall:.1f} s", f"{wall / budget:.2f}", "≤ 1")
    )
    text = report(rows + walls)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    for row in walls:
        if float(row[3]) > 1:
            print(f"WARNING: {row[0]} took {row[2]}, over its {row[1]}", file=sys.stderr)
    return 0


def report(rows: list[Row]) -> str:
    return f"machine: {machine()}\ncommand: {command()}\n\n{table(rows, HEADER)}\n"


if __name__ == "__main__":
    sys.exit(main())
