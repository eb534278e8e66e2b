"""recipes/charlm.py on the real tiny-shakespeare text: it learns, it samples from its weights alone, and resume,
accumulation and DDP give what one uninterrupted big-batch run gives."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO, accelerate_launch, assert_same_tensors, final_weights, metrics, train

RECIPE = REPO / "recipes" / "charlm.py"
TEXT = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"
SMALL = ["--model.layers", "1", "--model.width", "32", "--model.heads", "2", "--data.block-size", "16"]


def _args(out: Path, name: str, *extra: str | Path) -> list[str | Path]:
    return [RECIPE, "--data.path", TEXT, "--output-dir", out, "--run-name", name, "--logging.no-progress-bar",
            "--eval-every-steps", "0", "--checkpoint.every-steps", "0", *extra]  # fmt: skip


def test_the_default_model_learns_and_samples_text_from_its_weights(tmp_path, capsys):
    assert train(*_args(tmp_path, "lm", "--max-steps", "60", "--logging.every-steps", "20")) == 0
    train_losses = [r["loss"] for r in metrics(tmp_path / "lm", "train")]
    final = metrics(tmp_path / "lm", "final")[-1]
    assert train_losses[0] > train_losses[-1] and final["loss"] < 3.3  # from ln(65) = 4.17 at the start
    assert final["samples"] == 1742  # 111,540 held-out characters in windows of 64, each counted once
    assert final["bits_per_char"] == pytest.approx(final["loss"] / 0.6931471805599453)
    capsys.readouterr()
    args = [RECIPE, "--phase", "predict", "--weights", tmp_path / "lm" / "best.safetensors", "--output-dir", tmp_path,
            "--run-name", "sample", "--sample.prompt", "ROMEO:", "--sample.characters", "80",
            "--logging.no-progress-bar"]  # fmt: skip
    assert train(*args) == 0  # no --data.path: the vocabulary comes with the weights
    text = (tmp_path / "sample" / "sample.txt").read_text()
    assert text.startswith("ROMEO:") and len(text) == 86 and set(text) <= set(TEXT.read_text())
    assert text in capsys.readouterr().out


def test_a_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path):
    common = [*SMALL, "--max-steps", "20", "--checkpoint.every-steps", "10", "--checkpoint.keep-last", "5"]
    assert train(*_args(tmp_path, "straight", *common)) == 0
    step10 = tmp_path / "straight" / "checkpoints" / "step-00000010"
    assert train(*_args(tmp_path, "resumed", *common, "--resume", step10)) == 0
    assert metrics(tmp_path / "resumed", "setup")[0]["resumed_from"] == str(step10)
    assert_same_tensors(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "straight"))


def test_accumulation_equals_the_big_batch(tmp_path):
    common = [*SMALL, "--max-steps", "5"]
    assert train(*_args(tmp_path, "big", *common, "--data.batch-size", "12")) == 0
    assert train(*_args(tmp_path, "acc", *common, "--data.batch-size", "4", "--grad-accum-steps", "3")) == 0
    assert_same_tensors(final_weights(tmp_path / "acc"), final_weights(tmp_path / "big"), atol=1e-6)


@pytest.mark.slow
def test_two_processes_equal_one_with_twice_the_batch(tmp_path):
    common = [*SMALL, "--max-steps", "5"]
    assert train(*_args(tmp_path, "one", *common, "--data.batch-size", "12")) == 0
    accelerate_launch(2, *_args(tmp_path, "two", *common, "--data.batch-size", "6"))
    assert_same_tensors(final_weights(tmp_path / "two"), final_weights(tmp_path / "one"), atol=1e-6)
