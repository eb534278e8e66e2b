"""Recipe-owned tasks: exact normalisation over counted units (tokens) under accumulation and DDP, metrics reduced
exactly across processes, parameter groups, and one-line errors for tasks that return the wrong thing."""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed

from conftest import REPO, TEST_RECIPES, accelerate_launch, final_weights, train
from launcher.data import epoch_order, to_device
from launcher.recipe import load_recipe, parse_config
from launcher.task import output_tensor

PADDED = TEST_RECIPES / "padded_lm.py"


def _recipe_module():
    recipe = load_recipe(PADDED)
    return recipe, sys.modules["launcher_recipe_padded_lm"]


def _reference(kind: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(initial weights, the gradient of the mean over the global batch's units, the gradient a per-micro-batch
    mean over 4 micro-batches of 2 would give): a plain PyTorch computation of the first step."""
    recipe, module = _recipe_module()
    cfg = parse_config(recipe, ["--kind", kind], prog="t")
    set_seed(cfg.seed)  # as the launcher seeds before build_model
    model = recipe.make_model(cfg)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data = recipe.make_datasets(cfg).train
    order = epoch_order(len(data), cfg.seed, 0, shuffle=True)[:8]
    inputs, targets = (t[order] for t in data.tensors)

    def gradient(parts: list[slice]) -> dict[str, torch.Tensor]:
        model.zero_grad()
        for part in parts:
            logits = model(inputs[part])
            if kind == "lm":
                loss = F.cross_entropy(
                    logits.flatten(0, 1), targets[part].flatten(), ignore_index=module.IGNORE
                )
            else:
                loss = F.cross_entropy(logits, targets[part])
            (loss / len(parts)).backward()
        return {k: p.grad.detach().clone() for k, p in model.named_parameters()}

    return initial, gradient([slice(0, 8)]), gradient([slice(i, i + 2) for i in range(0, 8, 2)])


def _step(run_dir: Path, initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The first update of a run with SGD, lr 1, no momentum: minus the gradient it applied."""
    final = final_weights(run_dir)
    return {k: initial[k] - final[k] for k in final}


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=lambda m, k=key: f"{k}: {m}")


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("kind", ["lm", "classify"])
def test_accumulation_gives_the_big_batch_gradient_over_tokens_and_over_samples(tmp_path, kind):
    """4 micro-batches of 2 padded lines, which count different numbers of tokens, give exactly the gradient of
    the mean over all the real tokens of the 8 lines (lm), or over the 8 samples (the default per-sample loss).
    The naive mean of the micro-batches' means would be off: the check can fail."""
    initial, want, naive = _reference(kind)
    if kind == "lm":
        assert _max_difference(naive, want) > 1e-3  # token counts differ between micro-batches
    for name, extra in {"big": ["--data.batch-size", "8"], "accum": ["--data.batch-size", "2", "--grad-accum-steps", "4"]}.items():  # fmt: skip
        args = [
            PADDED,
            "--kind",
            kind,
            "--output-dir",
            tmp_path,
            "--run-name",
            name,
            "--logging.no-progress-bar",
        ]
        assert train(*args, *extra) == 0
        _assert_close(_step(tmp_path / name, initial), want)


@pytest.mark.parametrize("in_memory", [True, False])
def test_a_collate_fn_that_pads_each_batch_gives_the_same_gradient(tmp_path, in_memory):
    """Unpadded lines, padded per batch by the task's collate_fn (in memory, and through DataLoader workers): the
    same gradient as the big padded batch, whatever each batch's width."""
    initial, want, _ = _reference("lm")
    args = [PADDED, "--padding", "batch", "--output-dir", tmp_path, "--run-name", "c", "--logging.no-progress-bar",
            "--data.batch-size", "2", "--grad-accum-steps", "4", "--data.num-workers", "1"]  # fmt: skip
    assert train(*args, "--data.in-memory" if in_memory else "--data.no-in-memory") == 0
    _assert_close(_step(tmp_path / "c", initial), want)


def test_batches_of_any_nesting_reach_the_device_and_model_outputs_of_any_kind_give_logits():
    @dataclasses.dataclass
    class Batch:
        tokens: torch.Tensor
        extra: dict

    Pair = collections.namedtuple("Pair", "a b")
    batch = {
        "x": (torch.zeros(2), [Pair(torch.ones(1), 3)]),
        "d": Batch(torch.zeros(1), {"k": torch.ones(2)}),
    }
    moved = to_device(batch, torch.device("meta"))
    assert moved["x"][0].is_meta and moved["x"][1][0].a.is_meta and moved["x"][1][0].b == 3
    assert isinstance(moved["x"][1][0], Pair) and moved["d"].tokens.is_meta and moved["d"].extra["k"].is_meta
    logits = torch.randn(2, 3)
    hf_like = types.SimpleNamespace(logits=logits, loss=None)
    for output in (logits, (logits, "aux"), {"logits": logits}, hf_like):
        assert output_tensor(output) is logits


@pytest.mark.slow
def test_two_processes_with_accumulation_give_the_big_batch_gradient_over_tokens(tmp_path):
    """2 gloo processes x 2 lines x 2 accumulated micro-batches == the mean over the real tokens of all 8 lines:
    the window's token count is all-reduced before the gradients are divided by it."""
    initial, want, _ = _reference("lm")
    accelerate_launch(2, PADDED, "--output-dir", tmp_path, "--run-name", "ddp", "--logging.no-progress-bar",
                      "--data.batch-size", "2", "--grad-accum-steps", "2")  # fmt: skip
    _assert_close(_step(tmp_path / "ddp", initial), want)


@pytest.mark.slow
def test_metrics_are_reduced_exactly_across_processes_on_uneven_sets(tmp_path):
    """MSE, MAE, R² (tabular recipe, 93 held-out rows) and perplexity (char-LM, 401 windows): 2 processes with
    uneven shares report what 1 process does (sums in float64; only their order differs)."""
    script = REPO / "tests" / "scripts" / "metric_reduction.py"
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    subprocess.run([sys.executable, script, tmp_path / "one" / "m.json"], cwd=REPO, check=True, timeout=300)
    accelerate_launch(2, script, tmp_path / "two" / "m.json", module=False)
    one = json.loads((tmp_path / "one" / "m.json").read_text())
    two = json.loads((tmp_path / "two" / "m.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    for case in ("tabular", "charlm"):
        assert one[case].keys() == two[case].keys()
        for name, value in one[case].items():
            assert two[case][name] == pytest.approx(value, rel=1e-12, abs=0), (case, name)
    assert one["tabular"]["samples"] == 93 and one["charlm"]["samples"] == 401
    assert {"mse", "mae", "r2"} <= one["tabular"].keys() and "perplexity" in one["charlm"]


def test_parameter_groups_keep_their_own_settings_and_the_schedule_scales_each(tmp_path):
    """The char-LM's groups: weight decay on matrices only; each group's lr follows the schedule from its own
    peak (here both peaks are --optim.lr), and a resume applies this run's settings group by group."""
    text = tmp_path / "text.txt"
    text.write_text((REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt").read_text()[:5000])
    common = [REPO / "recipes" / "charlm.py", "--data.path", text, "--output-dir", tmp_path, "--run-name", "g",
              "--logging.no-progress-bar", "--model.layers", "1", "--model.width", "16", "--model.heads", "2",
              "--data.block-size", "8", "--eval-every-steps", "0", "--checkpoint.every-steps", "0"]  # fmt: skip
    assert train(*common, "--max-steps", "4") == 0
    ckpt = tmp_path / "g" / "checkpoints" / "step-00000004" / "optimizer.pt"
    groups = torch.load(ckpt, weights_only=True)["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    # 6 matrices (the output layer is the token embedding, tied), 3 norm weights
    assert len(groups[0]["params"]) == 6 and len(groups[1]["params"]) == 3
    assert train(*common, "--max-steps", "6", "--optim.weight-decay", "0.05") == 0
    groups = torch.load(ckpt.parents[1] / "step-00000006" / "optimizer.pt", weights_only=True)["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert all(g["initial_lr"] == 2e-3 for g in groups)


BAD_TASK = """
import torch, torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset
from launcher import Datasets, Loss, Task, TrainConfig, DataConfig

config = TrainConfig(max_steps=2, key_metric="loss", key_metric_mode="min", data=DataConfig(batch_size=4))

def build_model(cfg):
    return nn.Linear(3, 1)

def build_datasets(cfg):
    data = TensorDataset(torch.randn(16, 3), torch.randn(16))
    return Datasets(train=data, eval=data)

class Mistake(Task):
    def loss(self, model, batch):
        x, y = batch
        per_sample = (model(x).squeeze(-1) - y) ** 2
        return MISTAKE_LOSS

    def evaluate(self, model, batch):
        x, y = batch
        return MISTAKE_EVALUATE

    def metrics(self, t):
        return {"loss": t["sse"].item() / t["n"].item()}

def build_task(cfg):
    return Mistake()
"""
GOOD_LOSS = "Loss(per_sample.sum())"
GOOD_EVALUATE = '{"sse": ((model(x).squeeze(-1) - y) ** 2).sum(), "n": len(y)}'


@pytest.mark.parametrize(
    ("loss", "evaluate", "message"),
    [
        ("Loss(per_sample)", GOOD_EVALUATE, "Mistake.loss returned a sum of shape (4,), not a scalar"),
        ("Loss(per_sample.sum(), count=0)", GOOD_EVALUATE, "Mistake.loss returned a count of 0"),
        (
            "per_sample.mean()",
            GOOD_EVALUATE,
            "Mistake.loss must return a launcher.Loss(sum, count), got a Tensor",
        ),
        (GOOD_LOSS, '{"sse": [1.0], "n": len(y)}', "Mistake.evaluate returned 'sse' = a list: not reducible"),
        (GOOD_LOSS, '{"sse": "x", "n": len(y)}', "Mistake.evaluate returned 'sse' = a str: not reducible"),
    ],
)
def test_a_task_that_returns_the_wrong_thing_is_a_one_line_error_naming_it(
    tmp_path, capsys, loss, evaluate, message
):
    recipe = tmp_path / "bad.py"
    recipe.write_text(BAD_TASK.replace("MISTAKE_LOSS", loss).replace("MISTAKE_EVALUATE", evaluate))
    args = [recipe, "--output-dir", tmp_path, "--run-name", "r", "--logging.no-progress-bar"]
    assert train(*args) == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err and "Traceback" not in err, err


def test_a_batch_that_cannot_reach_the_device_is_a_one_line_error(tmp_path, capsys):
    recipe = tmp_path / "strings.py"
    recipe.write_text(
        BAD_TASK.replace("MISTAKE_LOSS", GOOD_LOSS).replace("MISTAKE_EVALUATE", GOOD_EVALUATE)
        + "\nclass Boxed:\n    pass\n\n"
        + "class Boxes(torch.utils.data.Dataset):\n    def __len__(self):\n        return 8\n"
        + "    def __getitem__(self, i):\n        return Boxed(), 0.0\n\n"
        + "def build_datasets(cfg):\n    return Datasets(train=Boxes(), eval=Boxes())\n"
        + "Mistake.collate_fn = staticmethod(lambda items: items)\n"
    )
    assert train(recipe, "--output-dir", tmp_path, "--run-name", "r", "--logging.no-progress-bar") == 2
    err = capsys.readouterr().err
    assert "a batch holds a Boxed, which cannot be moved to the device" in err and "Traceback" not in err, err


def test_a_key_metric_the_task_does_not_report_is_refused_up_front(capsys):
    recipe = REPO / "recipes" / "charlm.py"
    assert train(recipe, "--key-metric", "accuracy") == 2
    err = capsys.readouterr().err
    assert "--key-metric must be one of bits_per_char, loss, perplexity (got 'accuracy')" in err, err
    assert math.isfinite(1.0)


def test_the_schedule_scales_each_parameter_groups_own_lr():
    """A backbone at a tenth of the head's lr: warm-up and cosine scale both from their own peaks."""
    from launcher.config import OptimConfig, ScheduleConfig
    from launcher.optim import apply_hyperparameters, build_optimizer
    from launcher.schedules import lr_multiplier, make_scheduler, schedule_steps

    backbone, head = torch.nn.Linear(2, 2), torch.nn.Linear(2, 1)
    optim = OptimConfig(name="adamw", lr=1e-2)
    groups = [{"params": backbone.parameters(), "lr": 1e-3}, {"params": head.parameters()}]
    optimizer = build_optimizer(groups, optim)
    cfg = ScheduleConfig(warmup="linear", warmup_steps=4, decay="cosine")
    steps = schedule_steps(cfg, steps_per_epoch=10, total_steps=10)
    scheduler = make_scheduler(optimizer, steps, cfg)
    for step in range(10):
        m = lr_multiplier(step, steps, cfg)
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3 * m, 1e-2 * m], abs=0)
        optimizer.step()
        scheduler.step()
    # On resume, each group gets this run's settings: its own lr where it has one, --optim's otherwise.
    apply_hyperparameters(
        optimizer, OptimConfig(name="adamw", lr=2e-2), groups=[{"params": [], "lr": 1e-3}, {"params": []}]
    )
    assert [g["initial_lr"] for g in optimizer.param_groups] == [1e-3, 2e-2]
