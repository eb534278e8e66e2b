"""Exponential moving average of the weights, kept in a copy of the model that evaluates like the model.

decay_t = decay * min(1, t / warmup_steps) at optimizer step t: early averages forget the random init quickly,
later ones average over about 1 / (1 - decay) steps. Floating-point parameters and buffers are averaged with one
fused `_foreach_lerp_` per step (no allocation); integer buffers (BatchNorm's step counter) are copied.

Why not `torch.optim.swa_utils.AveragedModel` with `get_ema_multi_avg_fn`: on the MNIST recipe's model an update
costs 2.4x as long there (`python -m benchmarks.ema_update`, docs/benchmarks.md section 8): it rebuilds its
parameter lists and regroups them by device and dtype on every call, and reads its `n_averaged` tensor on the
host twice per update (`bool(n_averaged == 0)`), which on a GPU is a host sync per step. It also has no decay
warm-up, and blends BatchNorm's integer step counter arithmetically instead of copying it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from launcher.checkpoint.state_dict import strip_prefixes


class EMA:
    def __init__(self, model: nn.Module, decay: float, warmup_steps: int) -> None:
        self.decay, self.warmup_steps = decay, warmup_steps
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs_cache: tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]] | None = None
        self._source = model

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        if self._pairs_cache is None:
            ema, live, ints = [], [], []
            src = self._source.state_dict(keep_vars=True)
            for key, value in self.model.state_dict(keep_vars=True).items():
                if value.is_floating_point():
                    ema.append(value.data)
                    live.append(src[key].data)
                else:
                    ints.append((value.data, src[key].data))
            self._pairs_cache = (ema, live, ints)
        return self._pairs_cache

    def decay_at(self, step: int) -> float:
        if self.warmup_steps <= 0:
            return self.decay
        return self.decay * min(1.0, step / self.warmup_steps)

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the live model's current weights (call after the optimizer step `step`, 0-based)."""
        ema, live, ints = self._pairs()
        torch._foreach_lerp_(ema, live, 1.0 - self.decay_at(step))
        for dst, src in ints:
            dst.copy_(src)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return strip_prefixes(self.model.state_dict())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=True)
