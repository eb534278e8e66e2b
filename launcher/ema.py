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

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from launcher.checkpoint.sharded import is_sharded_model
from launcher.checkpoint.state_dict import strip_prefixes
from launcher.parallel import local_shard


class EMA:
    """The moving average of a model's weights. `applied()` gives a model that evaluates with them.

    A sharded model (FSDP) cannot be copied: its average is kept as shards of the same layout (each process
    averages its own shards, no communication), and `applied()` swaps them into the live model for the duration
    of an evaluation or a save, then puts the live weights back."""

    def __init__(self, model: nn.Module, decay: float, warmup_steps: int) -> None:
        self.decay, self.warmup_steps = decay, warmup_steps
        self._source = model
        self.sharded = is_sharded_model(model)
        if self.sharded:
            self.model = model  # only inside applied() does it hold the average
            copies: dict[int, torch.Tensor] = {}  # tied weights share one average, as in the copy below
            self._shadow = {
                k: copies.setdefault(id(v), v.detach().clone())
                for k, v in model.state_dict(keep_vars=True).items()
            }
        else:
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs_cache: tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]] | None = None

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        """(average, live) floating-point tensors, and (average, live) integer ones; local shards when sharded
        (looked up afresh each time: FSDP may re-register its parameters)."""
        if self._pairs_cache is not None:
            return self._pairs_cache
        ema, live, ints = [], [], []
        src = self._source.state_dict(keep_vars=True)
        averages = self._shadow if self.sharded else self.model.state_dict(keep_vars=True)
        seen: set[int] = set()
        for key, value in averages.items():
            # A tied weight appears under two names; averaging it twice per step would square its decay.
            if id(value) in seen:
                continue
            seen.add(id(value))
            mine, theirs = local_shard(value.data), local_shard(src[key].data)
            if value.is_floating_point():
                ema.append(mine)
                live.append(theirs)
            else:
                ints.append((mine, theirs))
        if not self.sharded:
            self._pairs_cache = (ema, live, ints)
        return ema, live, ints

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

    @contextlib.contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """A model holding the averaged weights: the copy, or the sharded live model with the average swapped in
        (and the live weights back afterwards)."""
        if not self.sharded:
            yield self.model
            return
        ema, live, ints = self._pairs()
        pairs = list(zip(ema, live, strict=True)) + ints
        kept = [theirs.clone() for _, theirs in pairs]
        was_training = self.model.training
        with torch.no_grad():
            for mine, theirs in pairs:
                theirs.copy_(mine)
        try:
            yield self.model.eval()
        finally:
            with torch.no_grad():
                for (_, theirs), saved in zip(pairs, kept, strict=True):
                    theirs.copy_(saved)
            self.model.train(was_training)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights (DTensor shards when sharded)."""
        return dict(self._shadow) if self.sharded else strip_prefixes(self.model.state_dict())

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Averaged weights: whole tensors (ema.safetensors), or shards of the same layout as this average."""
        if not self.sharded:
            self.model.load_state_dict(state, strict=True)
            return
        if missing := sorted(set(self._shadow) - set(state)):
            raise ValueError(f"the EMA weights lack {missing[:5]}")
        for key, mine in self._shadow.items():
            value = state[key]
            if isinstance(mine, DTensor) and not isinstance(
                value, DTensor
            ):  # whole: keep this process's shards
                value = distribute_tensor(value.to(mine.device), mine.device_mesh, mine.placements)
            local_shard(mine).copy_(local_shard(value))
