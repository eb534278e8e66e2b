"""Start-up model statistics and the test phase's per-class accuracy and confusion matrix."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torchvision.datasets import MNIST

from conftest import TEST_RECIPES, metrics, train
from launcher.model_stats import forward_flops, parameter_count
from launcher.recipe import load_recipe


def test_flops_and_parameters_match_a_hand_count():
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 28 * 28, 10))
    conv = 28 * 28 * 8 * (1 * 3 * 3) * 2  # output positions x output channels x multiply-adds per output x 2
    linear = 8 * 28 * 28 * 10 * 2
    assert forward_flops(model, torch.zeros(1, 1, 28, 28)) == conv + linear
    assert parameter_count(model) == (8 * 9 + 8 + 8 * 28 * 28 * 10 + 10,) * 2


def test_run_records_parameters_and_flops(tmp_path, mnist_root):
    assert (
        train(
            TEST_RECIPES / "mlp.py",
            "--data.root",
            mnist_root,
            "--output-dir",
            tmp_path,
            "--run-name",
            "r",
            "--max-steps",
            "2",
            "--logging.no-progress-bar",
        )
        == 0
    )
    setup = metrics(tmp_path / "r", "setup")[0]
    assert setup["parameters"] == 784 * 64 + 64 + 64 * 10 + 10
    assert setup["flops_per_sample"] == 2 * (784 * 64 + 64 * 10)
    assert "forward FLOPs per sample" in (tmp_path / "r" / "train.log").read_text()


def test_test_phase_prints_per_class_accuracy_and_logs_the_confusion_matrix(tmp_path, mnist_root, capsys):
    mlp = TEST_RECIPES / "mlp.py"
    assert (
        train(
            mlp,
            "--data.root",
            mnist_root,
            "--output-dir",
            tmp_path,
            "--run-name",
            "r",
            "--max-steps",
            "30",
            "--logging.no-progress-bar",
        )
        == 0
    )
    weights = tmp_path / "r" / "best.safetensors"
    capsys.readouterr()
    assert (
        train(
            mlp,
            "--phase",
            "test",
            "--weights",
            weights,
            "--data.root",
            mnist_root,
            "--output-dir",
            tmp_path,
            "--run-name",
            "t",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "confusion matrix (rows: true class, columns: predicted)" in out and "7 - seven" in out
    record = metrics(tmp_path / "t", "test")[0]

    # The matrix equals a direct computation with the same weights on the same digits.
    recipe = load_recipe(mlp)
    model = recipe.build_model(recipe.default)
    model.load_state_dict(load_file(weights))
    test = MNIST(mnist_root, train=False)
    with torch.no_grad():
        predicted = model((test.data.float()[:, None] / 255.0 - 0.1307) / 0.3081).argmax(1)
    expected = torch.zeros(10, 10, dtype=torch.int64)
    expected.index_put_((test.targets, predicted), torch.ones(len(test), dtype=torch.int64), accumulate=True)
    assert record["confusion"] == expected.tolist()
    per_class = (expected.diagonal() / expected.sum(1)).tolist()
    assert record["per_class_accuracy"] == per_class
    width = max(len(name) for name in test.classes)
    for i, acc in enumerate(per_class):
        assert f"{test.classes[i]:<{width}}  {expected[i].sum().item():>7}  {acc:>8.4f}" in out

    events = EventAccumulator(str(tmp_path / "t" / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "test/confusion_matrix" in events.Tags()["images"]
    image = events.Images("test/confusion_matrix")[0]
    assert image.encoded_image_string.startswith(b"\x89PNG") and image.width > 100
