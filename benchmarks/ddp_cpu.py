"""Benchmark 5: DDP on CPU, 2 gloo processes against 1, with and without gradient accumulation.

recipes/mnist.py on mnist-mini through `accelerate launch` (ACCELERATE_USE_CPU=1, one torch thread per process so
2 processes use the 2 cores the single process would), same global batch in every row. Time per optimizer step is
the median over logging intervals (from metrics.jsonl, evaluation and checkpoints left out); the gradient
all-reduces are counted with a DDP communication hook (tests/scripts/count_allreduce.py). Alternating rounds.

    python -m benchmarks.ddp_cpu [--steps 120] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

from benchmarks.common import MNIST_MINI, REPO, alternate, command, machine, median, table

COUNTER = REPO / "tests" / "scripts" / "count_allreduce.py"


def launch(processes: int, batch: int, accum: int, steps: int, out: Path, counts: dict) -> list[float]:
    name = f"p{processes}-b{batch}-a{accum}"
    count_file = out / f"{name}.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--num_processes", str(processes), *(["--multi_gpu"] if processes > 1 else []),
           str(COUNTER), str(count_file), str(REPO / "recipes" / "mnist.py"), "--data.root", str(MNIST_MINI),
           "--output-dir", str(out), "--run-name", name, "--resume", "none", "--max-steps", str(steps),
           "--data.batch-size", str(batch), "--grad-accum-steps", str(accum), "--eval-every-epochs", "0",
           "--checkpoint.every-epochs", "0", "--logging.every-steps", "10", "--logging.no-progress-bar"]  # fmt: skip
    threads = str(max(1, (os.cpu_count() or 2) // processes))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": threads}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    counts[name] = json.loads(count_file.read_text())["allreduce"]
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    last = max(i for i, r in enumerate(records) if r["kind"] == "setup")
    setup = records[last]
    train = [r for r in records[last:] if r["kind"] == "train"][1:]  # the first interval is warm-up
    return [setup["global_batch"] / r["samples_per_s"] for r in train]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    configs = {  # name: (processes, per-device batch, accumulation); global batch 128 everywhere
        "1 process, batch 128": (1, 128, 1),
        "2 processes, batch 64": (2, 64, 1),
        "1 process, batch 32 x 4 accumulation": (1, 32, 4),
        "2 processes, batch 16 x 4 accumulation": (2, 16, 4),
    }
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {name: partial(launch, *cfg, args.steps, Path(tmp), counts) for name, cfg in configs.items()}
        pooled = alternate(args.rounds, runs)
    rows = []
    for one, two in (
        ("1 process, batch 128", "2 processes, batch 64"),
        ("1 process, batch 32 x 4 accumulation", "2 processes, batch 16 x 4 accumulation"),
    ):
        t1, t2 = median(pooled[one]), median(pooled[two])
        p, b, a = configs[two]
        rows.append((f"s per optimizer step: {two} vs {one}", f"{t1:.4f}", f"{t2:.4f}", f"{t2 / t1:.2f}",
                     f"{counts[f'p{p}-b{b}-a{a}']} for {args.steps} steps"))  # fmt: skip
    print(f"machine: {machine()}\ncommand: {command()}\n")
    print(table(rows, ("metric", "1 process", "2 processes", "ratio", "gradient all-reduces (2 processes)")))


if __name__ == "__main__":
    main()
