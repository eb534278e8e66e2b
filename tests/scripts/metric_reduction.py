"""Evaluates the tabular recipe's regression (MSE, R²) and the char-LM's perplexity on uneven evaluation sets,
batch by batch of one sample, under however many processes launched it; rank 0 writes the metrics as JSON to OUT.
Usage: metric_reduction.py OUT.json (alone for 1 process, under `accelerate launch --num_processes 2` for 2)."""

import json
import sys
from pathlib import Path

import torch

from launcher.config import LoggingConfig, TrainConfig
from launcher.data import EvalData, Source
from launcher.evaluate import evaluate
from launcher.recipe import load_recipe
from launcher.train import _make_accelerator

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
out = Path(sys.argv[1])
accelerator = _make_accelerator(TrainConfig(logging=LoggingConfig(trackers=())), out.parent)
found = {"processes": accelerator.num_processes}
cases = {
    # 93 held-out rows: 47 and 46 on two processes.
    "tabular": ["--data.path", str(SHARED / "diabetes" / "diabetes.csv"), "--data.val-fraction", "0.21"],
    # The first 20,100 characters: 2,010 held out, 401 validation windows of 5 characters, 201 and 200.
    "charlm": ["--data.path", str(out.parent / "text.txt"), "--data.block-size", "5", "--model.layers", "1",
               "--model.width", "16", "--model.heads", "2"],
}  # fmt: skip
(out.parent / "text.txt").write_text((SHARED / "tinyshakespeare" / "input.txt").read_text()[:20_100])
for name, argv in cases.items():
    recipe = load_recipe(REPO / "recipes" / f"{name}.py")
    from launcher.recipe import parse_config

    cfg = parse_config(recipe, argv, prog=name)
    torch.manual_seed(0)
    model, task, data = recipe.make_model(cfg), recipe.make_task(cfg), recipe.make_datasets(cfg).eval
    source = Source(data, True, accelerator.device, 0, images=False)
    eval_data = EvalData(source, 1, accelerator.num_processes, accelerator.process_index, None)
    metrics, _ = evaluate(model, eval_data, accelerator, task)
    found[name] = metrics
if accelerator.is_main_process:
    out.write_text(json.dumps(found))
accelerator.wait_for_everyone()
