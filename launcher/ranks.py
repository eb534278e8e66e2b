"""Failing together: a user's mistake seen by one rank stops every rank, and only the ranks that saw it say why.

Under several processes a `UserError` on one rank (its node lacks the data, the main process alone finds that a
checkpoint is corrupt) must not leave the other ranks waiting in the next collective, which with gloo or NCCL
means until a 30-minute timeout. `agreed` runs a piece of setup, then all ranks all-reduce "did it fail here":
the reduction is also a barrier, so no rank runs ahead into a collective that another rank never reaches. The
ranks that failed raise their own error; the others raise `PeerFailed`, which the CLI exits on quietly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, reduce

from launcher.errors import UserError

T = TypeVar("T")


class PeerFailed(UserError):
    """Another rank failed and printed why; this one stops without a message of its own."""


def any_rank(flag: bool, group: Any = None) -> bool:
    """True on every rank when `flag` is true on any (one all-reduce; no communication for one process). The
    one agreement helper of the project: setup pieces (`agreed`) and checkpoint saves use it. `group`: a gloo
    group of the caller's own (a background thread must not use the default group's collectives)."""
    state = PartialState()
    if state.num_processes == 1:
        return flag
    if group is not None:
        tensor = torch.tensor([int(flag)])
        torch.distributed.all_reduce(tensor, group=group)
        return bool(tensor.item())
    tensor = torch.tensor([int(flag)], device=state.device)
    return bool(reduce(tensor, "sum").item())


def agreed(fn: Callable[[], T], main_only: bool = False) -> T:
    """`fn()` on every rank, or with `main_only` on the main process alone, whose result every rank then gets.
    A `UserError` anywhere stops every rank (see the module docstring)."""
    state = PartialState()
    result, error = None, None
    if not main_only or state.is_main_process:
        try:
            result = fn()
        except UserError as exc:
            error = exc
    if any_rank(error is not None):
        if error is not None:
            raise error
        raise PeerFailed("another process failed")
    if main_only and state.num_processes > 1:
        shared = [result]
        broadcast_object_list(shared)
        result = shared[0]
    return result  # type: ignore[return-value]
