"""Checkpoints of sharded models (`--parallel.strategy fsdp`): every process writes its own shards with
torch.distributed.checkpoint (`__RANK_0.distcp`, and `.metadata` from the main process) into the checkpoint's
temporary directory, and the checkpointer's commit protocol makes them one checkpoint, as it does with
model.safetensors and optimizer.pt. Reading reshards: any number of processes, sharded or not, load the same
files; the optimizer state is keyed by parameter name, not by position, so it survives a change of sharding.
"""

from __future__ import annotations

import contextlib
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

METADATA = ".metadata"


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint folder holds shards (torch.distributed.checkpoint) rather than model.safetensors."""
    return (Path(path) / METADATA).is_file()


def is_sharded_model(model: Any) -> bool:
    """Whether `model` is sharded across processes (FSDP2)."""
    return isinstance(model, FSDPModule)


def save(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None,
    folder: Path,
    aliases: dict[str, str],
    group: Any = None,
    asynchronous: bool = False,
) -> Future | None:
    """This process's shards of the model and optimizer into `folder`. Every process calls it (a collective).
    The state dict names a tied parameter once; `aliases` (`tied_names` of the model before it was sharded) travel
    beside it, so that the exported weights load into the plain model, whose state_dict has every name. `ema`:
    the moving average's shards (launcher.ema), if any. `asynchronous`: copy the shards to host memory now and
    write them in a background thread, whose collectives use `group` (not the training loop's); returns its
    future."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if ema is not None:
        state["ema"] = ema
    payload, one = {**state, "aliases": aliases}, not dist.is_initialized()
    with _one_process_is_fine():
        if asynchronous:
            return dcp.async_save(payload, checkpoint_id=folder, process_group=group, no_dist=one)
        dcp.save(payload, checkpoint_id=folder, process_group=group, no_dist=one)
    return None


def tied_names(model: nn.Module) -> dict[str, str]:
    """{alias: the first name} of every parameter the model holds under several names (tied weights). Ask the
    model before sharding it: FSDP keeps the tie but not necessarily one Parameter object for both names."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def load(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """A sharded checkpoint into `model` and `optimizer`, resharded to however they are spread now (sharded over
    any number of processes, or whole)."""
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    with _one_process_is_fine():
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def has_ema(folder: Path) -> bool:
    """Whether a sharded checkpoint holds moving-average weights."""
    metadata = dcp.FileSystemReader(str(folder)).read_metadata()
    return any(key.startswith("ema.") for key in metadata.state_dict_metadata)


def read_ema(folder: Path, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The moving-average weights of a sharded checkpoint, in the layout of `template` (shards or whole)."""
    state = {"ema": {k: v.detach().clone() for k, v in template.items()}}
    with _one_process_is_fine():
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    return state["ema"]


def load_whole(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    weights: dict[str, torch.Tensor],
    optimizer_state: dict,
) -> None:
    """A whole checkpoint (model.safetensors, optimizer.pt of a DDP run) into a sharded model: each process
    keeps its shards. optimizer.pt numbers the parameters in the order of the optimizer's groups; torch's own
    state-dict API names them in that order (a whole-state view of this run's optimizer, a collective)."""
    whole = StateDictOptions(full_state_dict=True)
    for group in optimizer.param_groups:  # torch's API wants the entries of the saved groups in the live ones
        for key in {k for g in optimizer_state["param_groups"] for k in g} - {"params"} - set(group):
            group[key] = group["lr"] if key == "initial_lr" else None
    named = get_optimizer_state_dict(model, optimizer, options=whole)
    order = [name for group in named["param_groups"] for name in group["params"]]
    by_name = {
        "state": {order[i]: value for i, value in optimizer_state["state"].items()},
        "param_groups": [
            {**g, "params": [order[i] for i in g["params"]]} for g in optimizer_state["param_groups"]
        ],
    }
    set_model_state_dict(model, weights, options=whole)
    set_optimizer_state_dict(model, optimizer, by_name, options=whole)


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The whole model of a sharded checkpoint, in this process alone (no process group): for export, --weights
    and the test phase."""
    with tempfile.TemporaryDirectory() as tmp:
        whole = Path(tmp) / "whole.pt"
        dcp_to_torch_save(folder, whole)
        saved = torch.load(whole, map_location="cpu", weights_only=True)
    weights = saved["model"]
    for alias, name in saved.get("aliases", {}).items():
        weights[alias] = weights[name]
    return weights


@contextlib.contextmanager
def _one_process_is_fine() -> Iterator[None]:
    """torch.distributed.checkpoint warns whenever it runs without a process group, which one process (a resume
    on fewer processes, a single-process run) does on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield


def optimizer_of(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's wrapper, if wrapped."""
    return getattr(optimizer, "optimizer", optimizer)
