"""State-dict helpers, dict in and dict out: prefixes, wrapper dicts, loading into a model, and the one rule for
tied tensors. Reading and writing files is `launcher.checkpoint.weights`.

Prefixes are stripped only at the *start* of a key, whole segments only: `module.features.module.0.weight`
becomes `features.module.0.weight` (the seed templates' `k.split('module.')[-1]` would give `0.weight`), and
opacus's `_module.` is not `module.`.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from launcher.errors import UserError, listing

# The wrappers that DataParallel/DDP and torch.compile put around a model.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys under which common training scripts nest the model's state dict (MODEL_STATE: the PyTorch DDP tutorial).
STATE_DICT_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "model0",
    "state_dict_ema",
    "model_ema",
    "MODEL_STATE",
)


def strip_prefixes(state: Mapping[str, Any], prefixes: Iterable[str] = WRAPPER_PREFIXES) -> dict[str, Any]:
    """Remove wrapper prefixes at the start of keys, repeatedly (`module._orig_mod.x` -> `x`), with torch's
    `consume_prefix_in_state_dict_if_present`, which also renames the `_metadata` entries (the module versions
    `load_state_dict` passes to BatchNorm and friends).

    Two keys that become equal are an error naming both (torch's helper would keep one silently).
    """
    prefixes = tuple(prefixes)
    origin: dict[str, str] = {}
    for key in state:
        new = key
        while new.startswith(prefixes):
            new = new[len(next(p for p in prefixes if new.startswith(p))) :]
        if new in origin:
            raise UserError(f"stripping {list(prefixes)} maps both {origin[new]!r} and {key!r} to {new!r}")
        origin[new] = key
    out: OrderedDict[str, Any] = OrderedDict(state)
    metadata = getattr(state, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict(metadata)  # type: ignore[attr-defined]
    while any(key.startswith(prefixes) for key in out):
        for prefix in prefixes:
            consume_prefix_in_state_dict_if_present(out, prefix)
    ordered: OrderedDict[str, Any] = OrderedDict((key, out[key]) for key in origin)  # torch's moves keys last
    if metadata is not None:
        ordered._metadata = out._metadata  # type: ignore[attr-defined]
    return ordered


def add_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Prepend `prefix` to every key (`module.` for code that loads into an nn.DataParallel model)."""
    return {prefix + key: value for key, value in state.items()}


def rename_prefix(state: Mapping[str, Any], old: str, new: str) -> dict[str, Any]:
    """Rewrite the key prefix `old` to `new`; a collision is an error naming both keys."""
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        renamed = new + key[len(old) :] if key.startswith(old) else key
        if renamed in out:
            raise UserError(
                f"renaming {old!r} to {new!r} maps both {origin[renamed]!r} and {key!r} to {renamed!r}"
            )
        out[renamed], origin[renamed] = value, key
    return out


def is_state_dict(obj: Any) -> bool:
    """A non-empty mapping of string keys to tensors."""
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def split_weights(
    obj: Any, key: str | None = None, source: str = "checkpoint"
) -> tuple[str | None, dict[str, torch.Tensor], dict[str, Any]]:
    """(the entry holding the weights, or None for a bare state dict; the state dict; the other entries).

    Without `key`, a wrapper dict is unwrapped when exactly one known state-dict key (STATE_DICT_KEYS) holds a
    state dict, or, failing that, when exactly one entry of any name does; otherwise the error lists the
    candidates.
    """
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise UserError(f"{source}: has no entry {key!r} (top-level entries: {keys})")
        if not is_state_dict(obj[key]):
            raise UserError(f"{source}: entry {key!r} is not a state dict of tensors")
        return key, dict(obj[key]), {k: v for k, v in obj.items() if k != key}
    if is_state_dict(obj):
        return None, dict(obj), {}
    if not isinstance(obj, Mapping):
        raise UserError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    candidates = [k for k in obj if isinstance(k, str) and is_state_dict(obj[k])]
    known = [k for k in candidates if k in STATE_DICT_KEYS]
    chosen = known if known else candidates
    if len(chosen) == 1:
        return chosen[0], dict(obj[chosen[0]]), {k: v for k, v in obj.items() if k != chosen[0]}
    raise UserError(
        f"{source}: cannot tell which entry holds the model weights; candidates: {candidates or list(obj)}. "
        "Name one with --key (launcher convert-ckpt / inspect-ckpt)"
    )


def unwrap(obj: Any, key: str | None = None, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict inside `obj`: `obj` itself, `obj[key]`, or the one known wrapper key it holds."""
    return split_weights(obj, key, source)[1]


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """`model.load_state_dict(strict=True)` with an error that lists what does not fit."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if own[k].shape != state[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {listing(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {listing(shapes)}")
        raise UserError(f"{source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def is_optimizer_state(value: Any) -> bool:
    """An optimizer's state_dict(): {'state': ..., 'param_groups': [...]}."""
    return isinstance(value, Mapping) and {"state", "param_groups"} <= set(value)


def holds_tensors(value: Any, depth: int = 0) -> bool:
    """Whether a checkpoint entry has tensors anywhere inside it (dicts, lists, argparse namespaces)."""
    if isinstance(value, torch.Tensor):
        return True
    if depth > 20:  # deeper than any real checkpoint; do not recurse without end on odd objects
        return False
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, Mapping):
        return any(holds_tensors(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(holds_tensors(v, depth + 1) for v in value)
    return False


# ---- tied tensors ----------------------------------------------------------------------------------------------
# Header metadata key under which a safetensors file records tied tensors: {"alias key": "stored key", ...}.
ALIASES_KEY = "launcher.aliases"


def untie(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """The one rule for tied tensors, for every weights file the project writes (checkpoints, best and EMA
    weights, convert-ckpt): (tensors to store, each in its own contiguous memory; aliases {alias: stored key};
    how many were made contiguous).

    Tied weights (one tensor under two names, e.g. an embedding and the output layer) are stored once, the alias
    recorded. Tensors that share memory in any other way (slices of one flat buffer) get their own copy:
    safetensors refuses shared memory, and a copy is what a reader expects anyway.
    """
    stored: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_view: dict[tuple, str] = {}
    for key, tensor in state.items():
        t = tensor.detach()
        view = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() > 0 and view in by_view:  # empty tensors all have data_ptr 0: never aliases
            aliases[key] = by_view[view]
            continue
        if t.numel() > 0:
            by_view[view] = key
        stored[key] = t
    owners = Counter(t.untyped_storage().data_ptr() for t in stored.values() if t.numel() > 0)
    made_contiguous = 0
    for key, t in stored.items():
        if not t.is_contiguous():
            stored[key], made_contiguous = t.contiguous(), made_contiguous + 1
        elif t.numel() > 0 and owners[t.untyped_storage().data_ptr()] > 1:
            stored[key] = t.clone()
    return stored, aliases, made_contiguous


def aliases_metadata(aliases: Mapping[str, str]) -> dict[str, str]:
    """The safetensors metadata entry that records `untie`'s aliases (none when there are none)."""
    return {ALIASES_KEY: json.dumps(dict(aliases))} if aliases else {}


def tie(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """The aliases a file's metadata records, put back in `tensors` (in place) as the very tensor they alias:
    loading copies the same values into both names, and a model whose weights are tied stays tied."""
    if ALIASES_KEY in metadata:
        for alias, stored in json.loads(metadata[ALIASES_KEY]).items():
            tensors[alias] = tensors[stored]
    return tensors
