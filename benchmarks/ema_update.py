"""Benchmark 8: one EMA update, launcher.ema.EMA against torch.optim.swa_utils.AveragedModel.

The MNIST recipe's model (recipes/mnist.py defaults), one torch thread, decay 0.999 on both; AveragedModel with
`get_ema_multi_avg_fn` and `use_buffers=True` (so it averages what EMA averages). Time per update is the median of
alternating rounds of 2,000 updates each. Both end with the same weights (checked), so only the time differs.

    python -m benchmarks.ema_update [--rounds 3] [--updates 2000]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from benchmarks.common import alternate, command, machine, median, table
from launcher.ema import EMA
from launcher.recipe import load_recipe


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--updates", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    recipe = load_recipe("recipes/mnist.py")
    model = recipe.make_model(recipe.default)
    ours = EMA(model, decay=0.999, warmup_steps=0)
    theirs = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999), use_buffers=True)
    theirs.update_parameters(model)  # its first call copies; from the second on it averages, like EMA's

    def timed(update) -> list[float]:
        start = time.perf_counter()
        for _ in range(args.updates):
            update()
        return [(time.perf_counter() - start) / args.updates * 1e6]

    pooled = alternate(
        args.rounds,
        {
            "launcher EMA": lambda: timed(lambda: ours.update(1000)),
            "AveragedModel": lambda: timed(lambda: theirs.update_parameters(model)),
        },
    )
    float_keys = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    same = all(
        torch.allclose(ours.model.state_dict()[k], theirs.module.state_dict()[k], rtol=1e-5, atol=1e-7)
        for k in float_keys
    )
    base = median(pooled["launcher EMA"])
    rows = [(name, f"{median(t):.0f}", f"{median(t) / base:.2f}x") for name, t in pooled.items()]
    print(f"{command()}\n{machine()}\nsame averaged weights: {same}\n")
    print(table(rows, ("update", "us per update (median)", "vs launcher")))


if __name__ == "__main__":
    main()
