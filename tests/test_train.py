"""End-to-end training on the real mnist-mini digits: accuracy, run directory, logs, evaluation, test phase."""

from __future__ import annotations

import json
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision.datasets import MNIST

from conftest import REPO, metrics, run_args, train
from launcher.recipe import load_recipe

MNIST_RECIPE = REPO / "recipes" / "mnist.py"


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory, mnist_root):
    """The MNIST recipe with its defaults (3 epochs) on the 8,000 training digits."""
    out = tmp_path_factory.mktemp("runs")
    assert train(MNIST_RECIPE, "--data.root", mnist_root, "--output-dir", out, "--run-name", "defaults") == 0
    return out / "defaults"


@pytest.mark.slow
def test_mnist_defaults_reach_975_percent_on_held_out_digits(mnist_run):
    final = metrics(mnist_run, "final")[-1]
    assert final["samples"] == 2000
    assert final["accuracy"] >= 0.975, final
    assert final["best_accuracy"] >= final["accuracy"]


@pytest.mark.slow
def test_run_directory_layout(mnist_run):
    for name in ("config.json", "command.txt", "env.json", "train.log", "metrics.jsonl", "best.safetensors"):
        assert (mnist_run / name).is_file(), name
    env = json.loads((mnist_run / "env.json").read_text())
    # env.json records the installed distributions' versions (importlib.metadata). For torch that is not always
    # torch.__version__: the CUDA wheel from PyPI installed here says "2.14.1" where torch.__version__ says
    # "2.14.1+cu130", while wheels from download.pytorch.org carry the local tag in both. It must be the release
    # of the torch that ran, local tag or not.
    for package in ("torch", "torchvision", "accelerate", "safetensors", "tyro", "launcher"):
        assert env["packages"][package] == metadata.version(package), package
    assert env["packages"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert "accuracy" in (mnist_run / "train.log").read_text()
    best = load_file(mnist_run / "best.safetensors")
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in best)
    records = metrics(mnist_run)
    assert {r["kind"] for r in records} >= {"setup", "train", "eval", "final"}
    setup = metrics(mnist_run, "setup")[0]
    assert setup["global_batch"] == 64 and setup["steps_per_epoch"] == 125 and setup["processes"] == 1
    assert [r["step"] for r in metrics(mnist_run, "eval")] == [125, 250, 375]


@pytest.mark.slow
def test_tensorboard_files_hold_the_expected_tags(mnist_run):
    acc = EventAccumulator(str(mnist_run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "eval/loss", "eval/accuracy"} <= tags, tags
    lr_steps = [e.step for e in acc.Scalars("train/lr")]
    assert lr_steps == list(range(1, 376))  # the lr of every optimizer step, at the step count it made
    eval_acc = [e.value for e in acc.Scalars("eval/accuracy")]
    assert eval_acc == pytest.approx([r["accuracy"] for r in metrics(mnist_run, "eval")])


@pytest.mark.slow
def test_eval_metrics_equal_a_direct_computation(mnist_run, mnist_root):
    """The logged evaluation of the best weights equals a plain loop over the test digits with those weights."""
    recipe = load_recipe(MNIST_RECIPE)
    model = recipe.build_model(recipe.default)
    model.load_state_dict(load_file(mnist_run / "best.safetensors"))
    model.eval()
    test = MNIST(mnist_root, train=False)
    images = (test.data.float()[:, None] / 255.0 - 0.1307) / 0.3081
    with torch.no_grad():
        logits = model(images)
    accuracy = (logits.argmax(1) == test.targets).sum().item() / len(test)
    loss = F.cross_entropy(logits, test.targets).item()
    best = max(metrics(mnist_run, "eval"), key=lambda r: r["accuracy"])
    assert best["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    assert best["loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dataparallel-pt", "safetensors", "wrapped-pt"])
def test_test_phase_on_given_weights(mnist_run, mnist_root, tmp_path, kind, capsys):
    weights = load_file(mnist_run / "best.safetensors")
    if kind == "dataparallel-pt":  # saved from nn.DataParallel without unwrapping: every key has `module.`
        recipe = load_recipe(MNIST_RECIPE)
        model = recipe.build_model(recipe.default)
        model.load_state_dict(weights)
        path = tmp_path / "dp.pt"
        torch.save(torch.nn.DataParallel(model).state_dict(), path)
        assert all(k.startswith("module.") for k in torch.load(path, weights_only=True))
    elif kind == "wrapped-pt":
        path = tmp_path / "ckpt.pth"
        torch.save({"state_dict": weights, "epoch": 3, "best_acc1": 0.99}, path)
    else:
        path = tmp_path / "w.safetensors"
        save_file(weights, path)
    code = train(
        *run_args(MNIST_RECIPE, tmp_path / "runs", "test", mnist_root, "--phase", "test", "--weights", path)
    )
    assert code == 0
    result = metrics(tmp_path / "runs" / "test", "test")[0]
    best = max(metrics(mnist_run, "eval"), key=lambda r: r["accuracy"])
    assert result["accuracy"] == best["accuracy"] and result["samples"] == 2000
    assert f"accuracy {best['accuracy']:.4f}" in capsys.readouterr().out


def test_test_phase_with_weights_that_do_not_fit(tmp_path, mnist_root, capsys):
    path = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(3, 3)}, path)
    code = train(
        *run_args(MNIST_RECIPE, tmp_path / "runs", "bad", mnist_root, "--phase", "test", "--weights", path)
    )
    assert code == 2
    err = capsys.readouterr().err
    assert (
        "does not fit the model" in err and "unexpected keys (1): fc.weight" in err and "missing keys" in err
    )
