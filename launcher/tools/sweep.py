"""`launcher sweep-summary DIR`: one table row per run directory under DIR, best run first.

A run is a folder with a metrics.jsonl. Its row holds the config values that differ between the runs (what the
sweep varied, read from each config.json), the final metrics (the `{"kind": "final"}` line of metrics.jsonl) and
the best value of the key metric with its step. A run without a final line (still running, preempted, failed)
shows its last evaluation and its state instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launcher.config import flatten
from launcher.errors import UserError
from launcher.files import read_jsonl

# Config entries that differ between runs without being what a sweep compares.
NOT_VARIED = {"run_name", "output_dir"}
# Final-line entries that are bookkeeping, not metrics.
NOT_METRICS = {"kind", "step", "epoch", "samples"}


@dataclass
class Run:
    name: str
    config: dict[str, Any]
    """The flattened config.json ({"optim.lr": 0.1, ...}); empty when the file is missing."""
    metrics: dict[str, Any]
    """The final line, or the last evaluation of an unfinished run."""
    step: int
    state: str
    """done, or unfinished (no final line yet: running, preempted or failed)."""
    best: float | None = None
    best_step: int | None = None


def read_run(run_dir: Path) -> Run:
    """One run's row data from its metrics.jsonl and config.json."""
    records, _ = read_jsonl(run_dir / "metrics.jsonl")  # a line cut short by a killed process is skipped
    config_file = run_dir / "config.json"
    config = flatten(json.loads(config_file.read_text())) if config_file.is_file() else {}
    key = str(config.get("key_metric", "accuracy"))
    finals = [r for r in records if r.get("kind") == "final"]
    evals = [r for r in records if r.get("kind") == "eval"]
    steps = [r.get("step", 0) for r in records]
    if finals:
        last = finals[-1]
        return Run(
            run_dir.name,
            config,
            last,
            last.get("step", 0),
            "done",
            last.get(f"best_{key}"),
            last.get("best_step"),
        )
    last = evals[-1] if evals else {}
    best_step = None
    if evals and last.get(f"best_{key}") is not None:
        best_step = next((r["step"] for r in evals if r.get(key) == last[f"best_{key}"]), None)
    return Run(
        run_dir.name, config, last, max(steps, default=0), "unfinished", last.get(f"best_{key}"), best_step
    )


def find_runs(folder: Path) -> list[Run]:
    """Every run directory directly under `folder` (or `folder` itself when it is one)."""
    if not folder.is_dir():
        raise UserError(f"{folder} is not a directory")
    dirs = [folder] if (folder / "metrics.jsonl").is_file() else []
    dirs += sorted(p for p in folder.iterdir() if (p / "metrics.jsonl").is_file())
    if not dirs:
        raise UserError(f"no runs in {folder}: no metrics.jsonl in it or in its subdirectories")
    return [read_run(d) for d in dirs]


def varied_keys(runs: Sequence[Run]) -> list[str]:
    """Config entries whose values differ between the runs, in config order."""
    keys: dict[str, None] = {}
    for run in runs:
        keys |= dict.fromkeys(run.config)
    return [k for k in keys if k not in NOT_VARIED and len({repr(run.config.get(k)) for run in runs}) > 1]


def _fmt(value: Any, setting: bool = False) -> str:
    """A cell: settings as written (0.05, 1e-4), metrics to four decimals so a column lines up."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if setting or math.isnan(value) or math.isinf(value):
            return f"{value:g}"
        return f"{value:.4f}" if 1e-3 <= abs(value) < 1e4 or value == 0 else f"{value:.3e}"
    if isinstance(value, tuple):
        return ",".join(_fmt(v, setting) for v in value)
    return str(value)


def table(runs: Sequence[Run], sort: str | None = None) -> str:
    """The summary as aligned text; sorted by `sort` (a column name) or by the best key metric, best first."""
    key = str(runs[0].config.get("key_metric", "accuracy"))
    mode = str(runs[0].config.get("key_metric_mode", "max"))
    varied = varied_keys(runs)
    metric_names: dict[str, None] = {}
    for run in runs:
        metric_names |= dict.fromkeys(
            k
            for k, v in run.metrics.items()
            if k not in NOT_METRICS and not k.startswith("best_") and isinstance(v, (int, float))
        )
    columns = ["run", *varied, "step", *metric_names, f"best_{key}", "best_step", "state"]
    rows = [
        {
            "run": run.name,
            **{k: run.config.get(k) for k in varied},
            "step": run.step,
            **{m: run.metrics.get(m) for m in metric_names},
            f"best_{key}": run.best,
            "best_step": run.best_step,
            "state": run.state,
        }
        for run in runs
    ]
    sort_by = sort or f"best_{key}"
    if sort_by not in columns:
        raise UserError(f"--sort {sort_by}: no such column; the columns are {', '.join(columns)}")
    descending = sort is None and mode == "max"
    present = [r for r in rows if isinstance(r[sort_by], (int, float, str))]
    missing = [r for r in rows if r not in present]  # runs without the value go last, in name order
    present.sort(key=lambda r: (isinstance(r[sort_by], str), r[sort_by]), reverse=descending)
    cells = [columns] + [[_fmt(r[c], c in varied) for c in columns] for r in present + missing]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    text_columns = {0, len(columns) - 1}  # run and state read left-aligned, numbers right-aligned
    lines = [
        "  ".join(
            c.ljust(w) if i in text_columns else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    order = "smallest" if sort is not None or mode == "min" else "largest"
    return "\n".join(lines) + f"\n{len(runs)} run(s), sorted by {sort_by}, {order} first\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launcher sweep-summary",
        description="Tabulate the final and best metrics of every run directory under DIR, best run first. "
        "Columns: the config entries the runs differ in, the final metrics, the best key metric and its step.",
    )
    parser.add_argument("dir", type=Path, help="folder of run directories (e.g. runs/sweep-JOBID)")
    parser.add_argument(
        "--sort", help="column to sort by, smallest first (default: best key metric, best first)"
    )
    args = parser.parse_args(argv)
    try:
        print(table(find_runs(args.dir), args.sort), end="")
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
