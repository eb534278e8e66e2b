"""Weights files: writing safetensors (tied tensors stored once), reading the loop's own, reading anyone's.

Two readers, for two levels of trust:
- `read_own` reads a weights file of a checkpoint this run has just verified (sizes and CRC-32 checksums in its
  COMPLETE marker): straight through safetensors, no hostile-file validation on the resume path.
- `read_weights` is what the trainer's `--weights` calls, for a file of any origin: it accepts everything
  `launcher convert-ckpt` accepts without converting first (wrapper dicts, prefixes, numpy and argparse extras,
  legacy and Python-2-era files), because both read through `launcher.checkpoint.safe_load`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import launcher.checkpoint.sharded as sharded
from launcher.checkpoint.format import verify
from launcher.checkpoint.safe_load import load_checkpoint
from launcher.checkpoint.state_dict import aliases_metadata, strip_prefixes, tie, untie, unwrap
from launcher.errors import UserError
from launcher.files import write_atomic


def save_safetensors(
    state: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """`state` to a safetensors file (not atomically: see `write_weights`), tied tensors stored once and
    recorded in the metadata (`untie`). Returns untie's (stored, aliases, made contiguous)."""
    stored, aliases, contiguous = untie(state)
    save_file(stored, path, metadata={"format": "pt", **(metadata or {}), **aliases_metadata(aliases)})
    return stored, aliases, contiguous


def write_weights(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Weights to `path` (best.safetensors, ema.safetensors) as a checkpoint writes them, atomically: a crash
    never leaves half a file."""
    write_atomic(path, lambda tmp: save_safetensors(state, tmp), tmp=path.with_name(path.name + ".tmp"))


def read_own(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file this project wrote into a checkpoint that has been verified, with tied
    tensors tied again."""
    with safe_open(path, "pt") as f:
        return tie({k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {})  # noqa: SIM118 (not a dict)


def read_weights(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Model weights from a .safetensors file, a torch.save file or a launcher checkpoint folder, prefixes
    stripped. torch.save files are read with weights_only=True only (see launcher.checkpoint.safe_load); a
    launcher checkpoint folder (`step-00001200/`) is verified and its model.safetensors read."""
    path = Path(path)
    if path.is_dir() and sharded.is_sharded(path):  # a checkpoint of --parallel.strategy fsdp
        verify(path)
        return strip_prefixes(sharded.read_weights(path))
    path = weights_file(path)
    return strip_prefixes(unwrap(load_checkpoint(path).obj, key, source=str(path)))


def weights_file(path: Path) -> Path:
    """The file holding the weights: `path` itself, or the model.safetensors of a verified launcher checkpoint."""
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise UserError(f"{path}: a folder, but not a launcher checkpoint (it has no model.safetensors)")
        verify(path)
        return path / "model.safetensors"
    if not path.is_file():
        raise UserError(f"weights file {str(path)!r} not found")
    return path
