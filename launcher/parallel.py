"""How the model is spread over the processes: DDP (Accelerate's `prepare`) or FSDP2 (`fully_shard`).

Accelerate's FSDP plugin does not run on CPUs (with `ACCELERATE_USE_CPU=1` it falls back to DDP, silently), so the
loop applies `torch.distributed.fsdp.fully_shard` itself, the same code path on gloo and on NCCL; Accelerate keeps
owning the process group and the devices. Each of the recipe's `fsdp_units(model)` (transformer blocks, residual
stages) is one unit whose parameters are gathered for its forward and backward and freed after; the model itself
is the last unit. Without `fsdp_units`, the whole model is one unit: parameters, gradients and optimizer state are
still sharded between steps, but a forward gathers all parameters at once. With one process nothing is sharded;
checkpoints are still written in the sharded format, so the run can resume on more processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from launcher.checkpoint.sharded import is_sharded_model as is_sharded
from launcher.config import TrainConfig
from launcher.errors import UserError


def shard(
    model: nn.Module, units: Callable[[nn.Module], Iterable[nn.Module]] | None, cfg: TrainConfig, world: int
) -> nn.Module:
    """`model` with its units and itself sharded over the `world` processes (FSDP2); bf16 mixed precision through
    FSDP's policy (bf16 parameters in forward and backward, gradients reduced in fp32)."""
    if world == 1:
        return model
    policy = MixedPrecisionPolicy()
    if cfg.mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    chosen = list(units(model)) if units is not None else []
    for unit in chosen:
        if not isinstance(unit, nn.Module) or unit is model:
            raise UserError(f"fsdp_units must give submodules of the model, got {type(unit).__name__}")
        fully_shard(unit, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def gradient_sync(model: Any, accelerator: Any, sync: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch: reduce its gradients across processes only when `sync` (the window's last)."""
    if sync:
        return contextlib.nullcontext()
    if is_sharded(model):
        return _sharded_no_sync(model)
    return accelerator.no_sync(model)


@contextlib.contextmanager
def _sharded_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on the CPU of the main process (every process must call this for a sharded model;
    the others get an empty dict), or the model's own state dict."""
    if not is_sharded(model):
        return model.state_dict()
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def local(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a DTensor result (a gradient norm), or the tensor itself."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def local_shard(value: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a view: changing it in place changes the DTensor), or the tensor."""
    return value.to_local() if isinstance(value, DTensor) else value
