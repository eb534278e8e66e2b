"""State-dict helpers: prefixes, wrapper dicts, and reading weights files safely.

Prefixes are stripped only at the *start* of a key, whole segments only: `module.features.module.0.weight`
becomes `features.module.0.weight` (the seed templates' `k.split('module.')[-1]` would give `0.weight`), and
opacus's `_module.` is not `module.`.

`read_weights` is what the trainer's `--weights` calls, and it accepts everything `launcher convert-ckpt` accepts
without converting first (wrapper dicts, prefixes, numpy and argparse extras, legacy and Python-2-era files),
because both read files through `launcher.safe_load`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from launcher.errors import UserError
from launcher.safe_load import load_checkpoint

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


def read_weights(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Model weights from a .safetensors file, a torch.save file or a launcher checkpoint folder, prefixes stripped.

    torch.save files are read with weights_only=True only (see launcher.safe_load); a launcher checkpoint folder
    (`step-00001200/`) is verified and its model.safetensors read.
    """
    path = weights_file(Path(path))
    return strip_prefixes(unwrap(load_checkpoint(path).obj, key, source=str(path)))


def weights_file(path: Path) -> Path:
    """The file holding the weights: `path` itself, or the model.safetensors of a verified launcher checkpoint."""
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise UserError(f"{path}: a folder, but not a launcher checkpoint (it has no model.safetensors)")
        from launcher.checkpoint import verify  # imported here: launcher.checkpoint imports this module

        verify(path)
        return path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"weights file {str(path)!r} not found")
    return path


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
