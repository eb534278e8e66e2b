"""State-dict helpers: prefixes, wrapper dicts, and reading weights files safely.

Prefixes are stripped only at the *start* of a key, whole segments only: `module.features.module.0.weight`
becomes `features.module.0.weight` (the seed templates' `k.split('module.')[-1]` would give `0.weight`), and
opacus's `_module.` is not `module.`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from launcher.errors import UserError

# The wrappers that DataParallel/DDP and torch.compile put around a model.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Keys under which common training scripts nest the model's state dict.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "model0", "state_dict_ema", "model_ema")


def strip_prefixes(state: Mapping[str, Any], prefixes: Iterable[str] = WRAPPER_PREFIXES) -> dict[str, Any]:
    """Remove wrapper prefixes at the start of keys, repeatedly (`module._orig_mod.x` -> `x`).

    Two keys that become equal are an error naming both.
    """
    prefixes = tuple(prefixes)
    out: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for key, value in state.items():
        new = key
        while new.startswith(prefixes):
            new = new[len(next(p for p in prefixes if new.startswith(p))) :]
        if new in out:
            raise UserError(f"stripping {list(prefixes)} maps both {origin[new]!r} and {key!r} to {new!r}")
        out[new], origin[new] = value, key
    return out


def add_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
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
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def unwrap(obj: Any, key: str | None = None, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The model state dict inside `obj`: `obj` itself, `obj[key]`, or the one known wrapper key it holds."""
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise UserError(f"{source}: has no entry {key!r} (top-level entries: {keys})")
        obj = obj[key]
        if not is_state_dict(obj):
            raise UserError(f"{source}: entry {key!r} is not a state dict of tensors")
        return dict(obj)
    if is_state_dict(obj):
        return dict(obj)
    if not isinstance(obj, Mapping):
        raise UserError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    candidates = [k for k in obj if isinstance(k, str) and is_state_dict(obj[k])]
    known = [k for k in candidates if k in STATE_DICT_KEYS]
    if len(known) == 1:
        return dict(obj[known[0]])
    if len(candidates) == 1 and not known:
        return dict(obj[candidates[0]])
    raise UserError(
        f"{source}: cannot tell which entry holds the model weights; candidates: {candidates or list(obj)}. "
        "Name one with --key"
    )


def read_weights(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Model weights from a .safetensors file or a torch.save file (weights_only=True), prefixes stripped."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"weights file {str(path)!r} not found")
    if path.suffix == ".safetensors":
        try:
            return strip_prefixes(load_file(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises many kinds; all mean "not a safe state dict"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{path}: cannot be read safely with torch.load(weights_only=True): {first}. "
            "Inspect it with `launcher inspect-ckpt` and convert it with `launcher convert-ckpt`"
        ) from None
    return strip_prefixes(unwrap(obj, key, source=str(path)))


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
            parts.append(f"missing keys ({len(missing)}): {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_short(unexpected)}")
        if shapes:
            parts.append(f"shape mismatches ({len(shapes)}): {_short(shapes)}")
        raise UserError(f"{source} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def _short(items: list[str], n: int = 6) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items) - n} more)" if len(items) > n else "")
