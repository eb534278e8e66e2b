"""recipes/cifar10.py without CIFAR-10: the 32x32 ResNet-18 and LeNet shapes, FakeData smoke runs through the
whole loop, and the message when the data is missing."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchvision.models import ResNet

from conftest import REPO, metrics, train
from launcher.recipe import load_recipe, parse_config

RECIPE = REPO / "recipes" / "cifar10.py"


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(RECIPE)


def test_resnet18_keeps_32x32_resolution_into_the_first_stage(recipe):
    model = recipe.build_model(parse_config(recipe, [], "t"))
    assert isinstance(model, ResNet)  # torchvision's network, only the stem replaced
    assert (model.conv1.kernel_size, model.conv1.stride) == ((3, 3), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    sizes = {}

    def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        sizes[module] = tuple(output.shape)

    model.layer1.register_forward_hook(record)
    model.layer4.register_forward_hook(record)
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    # The ImageNet stem would give 8x8 after layer1 and 1x1 after layer4.
    assert (sizes[model.layer1], sizes[model.layer4]) == ((2, 64, 32, 32), (2, 512, 4, 4))
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


def test_lenet_variant(recipe):
    model = recipe.build_model(parse_config(recipe, ["--model.arch", "lenet"], "t"))
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert sum(p.numel() for p in model.parameters()) == 62_006  # LeNet-5 on 3-channel 32x32 images


def test_unknown_arch_lists_the_choices(recipe, capsys):
    with pytest.raises(SystemExit):
        parse_config(recipe, ["--model.arch", "vgg"], "t")
    err = capsys.readouterr().err
    assert "--model.arch" in err and "resnet18" in err and "lenet" in err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("arch", "samples", "batch"),
    # ResNet-18 costs about 3.3 GFLOPs per training image: 10-50 images/s on two shared CPU cores.
    [("lenet", 256, 32), ("resnet18", 16, 8)],
)
def test_fake_data_smoke_run(arch, samples, batch, tmp_path):
    args = ("--model.arch", arch, "--data.fake-samples", samples, "--data.batch-size", batch)
    args += ("--max-epochs", 1, "--output-dir", tmp_path, "--run-name", arch, "--logging.every-steps", 1)
    assert train(RECIPE, *args, "--logging.no-progress-bar") == 0
    run = tmp_path / arch
    steps = samples // batch
    assert metrics(run, "setup")[0]["total_steps"] == steps
    losses = [r["loss"] for r in metrics(run, "train")]
    assert len(losses) == steps and all(math.isfinite(x) for x in losses)
    final = metrics(run, "final")[-1]
    assert final["step"] == steps and final["samples"] == samples // 4 and math.isfinite(final["loss"])
    assert (run / "best.safetensors").is_file()


def test_missing_cifar_says_where_it_looked_and_how_to_fix_it(tmp_path, capsys):
    code = train(RECIPE, "--data.root", tmp_path / "data", "--data.no-download", "--output-dir", tmp_path)
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: CIFAR-10 not found in {tmp_path / 'data' / 'cifar-10-batches-py'}")
    assert "--data.no-download is set" in err and "--data.root DIR" in err and "--data.fake-samples" in err
    assert "Traceback" not in err
