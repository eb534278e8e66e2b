"""Benchmark 10: FSDP against DDP on 2 CPU processes (gloo): memory per rank, step time, checkpoint save time.

A larger char-LM than the recipe's default (`--layers 4 --width 384`: 7.2M parameters) trained through the real
command, `accelerate launch --multi_gpu --num_processes 2 -m launcher.train recipes/charlm.py`, with
`--parallel.strategy ddp` and `fsdp` in alternating rounds, one torch thread per process. Per rank, after
training: the bytes of the parameters, gradients and AdamW state it holds (counted from its tensors, a DTensor's
local shard only), and its peak RSS (both in the run's final record, `memory`, one entry per rank); step time is the median of
the logged intervals (samples/s, evaluation and checkpoints left out); save time is the launcher's own
"saved checkpoint" line (every rank writes its shards under fsdp, rank 0 the whole state under ddp), or with
`--checkpoint.async-save` the time training was blocked (the copy of the shards to host memory).

    python -m benchmarks.fsdp_cpu [--steps 40] [--rounds 2] [--layers 4] [--width 384]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, command, machine, median, table

TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


VARIANTS = {"ddp": ["--parallel.strategy", "ddp"], "fsdp": ["--parallel.strategy", "fsdp"],
            "fsdp, async save": ["--parallel.strategy", "fsdp", "--checkpoint.async-save"]}  # fmt: skip


def launch(variant: str, out: Path, args: argparse.Namespace) -> dict:
    name = f"run-{len(list(out.iterdir()))}"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--multi_gpu", "--num_processes", "2", "-m", "launcher.train",
           str(REPO / "recipes" / "charlm.py"), "--data.path", str(TEXT), "--output-dir", str(out), "--run-name",
           name, *VARIANTS[variant], "--max-steps", str(args.steps), "--logging.every-steps", "10",
           "--eval-every-steps", "0", "--checkpoint.every-steps", str(args.steps), "--logging.no-progress-bar",
           "--model.layers", str(args.layers), "--model.width", str(args.width), "--model.heads", "4",
           "--data.batch-size", "8"]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    sps = [r["samples_per_s"] for r in records if r["kind"] == "train"][1:]  # the first interval warms up
    memory = next(r for r in records if r["kind"] == "final")["memory"]
    # The time training waits for a save: the whole save, or with async_save the copy to host memory.
    saves = [
        float(s) for s in re.findall(r"(?:saved checkpoint step \d+ \(|\(blocked )([\d.]+)s\)", result.stdout)
    ]
    return {"step_s": [16 / s for s in sps], "memory": memory, "save_s": saves}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=384)
    args = parser.parse_args()
    pooled: dict[str, dict[str, list]] = {v: {"step_s": [], "memory": [], "save_s": []} for v in VARIANTS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for variant in list(VARIANTS) if r % 2 == 0 else reversed(VARIANTS):
                for key, values in launch(variant, Path(tmp), args).items():
                    pooled[variant][key] += values
    rows = []
    ddp_state = max(m["state_bytes"] for m in pooled["ddp"]["memory"])
    ddp_rss = max(m["peak_rss_bytes"] for m in pooled["ddp"]["memory"])
    for strategy in VARIANTS:
        p = pooled[strategy]
        state = max(m["state_bytes"] for m in p["memory"])
        rss = max(m["peak_rss_bytes"] for m in p["memory"])
        rows.append((strategy, f"{state / 1e6:.1f} MB", f"{state / ddp_state:.2f}", f"{rss / 1e6:.0f} MB",
                     f"{rss / ddp_rss:.2f}", f"{median(p['step_s']) * 1e3:.0f} ms",
                     f"{median(p['save_s']) * 1e3:.0f} ms"))  # fmt: skip
    print(f"machine: {machine()}\ncommand: {command()}\n")
    print(table(rows, ("strategy", "params+grads+AdamW per rank", "vs ddp", "peak RSS per rank", "vs ddp",
                       "step time", "training blocked per save")))  # fmt: skip


if __name__ == "__main__":
    main()
