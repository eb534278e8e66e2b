"""`launcher inspect-ckpt`: what a checkpoint holds, read without running code from it."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from launcher.checkpoint.safe_load import load_checkpoint, sniff_format, unsafe_globals
from launcher.checkpoint.state_dict import (
    ALIASES_KEY,
    WRAPPER_PREFIXES,
    holds_tensors,
    is_optimizer_state,
    split_weights,
)
from launcher.checkpoint.weights import weights_file
from launcher.errors import UserError
from launcher.model_stats import human

DESCRIPTION = """\
Show what a checkpoint holds: its format, the wrapper dict's entries and which one holds
the weights, the number of tensors, their dtypes and total size, the key prefixes found
(`module.` from DataParallel/DDP, `_orig_mod.` from torch.compile, others such as opacus's
`_module.`), and the non-tensor entries (epoch, accuracy, args). The file is read with
torch.load(weights_only=True) only, so nothing in it runs; for a file that cannot be read
that way it names the Python globals the file would need, and why."""

EXAMPLES = """\
examples:
  launcher inspect-ckpt model_best.pth.tar
  launcher inspect-ckpt ckpt.pth --key state_dict_ema --all
  launcher inspect-ckpt runs/mnist/checkpoints/step-00000375

exit status: 0 read; 2 cannot be read safely, or not a checkpoint (the message says why)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launcher inspect-ckpt",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input",
        type=Path,
        help="a torch.save file (.pt, .pth, .pth.tar, .bin, ...), a .safetensors file or a launcher "
        "checkpoint folder. Example: ckpt.pth",
    )
    p.add_argument(
        "--key",
        help="describe this entry of a wrapper dict as the weights (as convert-ckpt --key would use it). "
        "Example: --key state_dict_ema",
    )
    p.add_argument(
        "--all",
        action="store_true",
        help="list every tensor with its dtype and shape (default: the first 8). Example: --all",
    )
    return p


def describe(path: Path, key: str | None = None, list_all: bool = False) -> list[str]:
    """The report's lines. Raises UserError (after nothing is printed) if the file cannot be read safely."""
    path = weights_file(path)
    loaded = load_checkpoint(path)
    lines = [
        f"file:      {path} ({human(path.stat().st_size, 'B')})",
        f"format:    {_format_line(loaded.format)}, read safely",
    ]
    lines += [f"note:      {n}" for n in loaded.notes]
    obj = loaded.obj
    weights_key, state, extras = split_weights(obj, key, str(path))
    if weights_key is not None:
        lines.append(f"top level: {type(obj).__name__} with {len(obj)} entries: {', '.join(map(str, obj))}")
    size = sum(t.numel() * t.element_size() for t in state.values())
    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in state.values())
    where = f"entry {weights_key!r}" if weights_key else "the whole file (a bare state dict)"
    lines.append(
        f"weights:   {where}: {len(state)} tensors, {human(size, 'B')} "
        f"({', '.join(f'{d} x{n}' for d, n in dtypes.most_common())})"
    )
    lines.append(f"prefixes:  {prefix_report(list(state))}")
    # The safetensors header's string metadata (safetensors.torch writes format=pt; the launcher records tied
    # tensors under ALIASES_KEY) describes the file, not entries of a checkpoint dict.
    metadata = {k: v for k, v in loaded.metadata.items() if k != ALIASES_KEY}
    if metadata:
        lines.append(
            f"metadata:  {', '.join(f'{k}={v}' for k, v in sorted(metadata.items()))} (safetensors header)"
        )
    for name, value in extras.items():
        lines.append(f"entry:     {name} = {_value_summary(value)}")
    shown = list(state.items()) if list_all else list(state.items())[:8]
    for i, (k, t) in enumerate(shown):
        head = "tensors:  " if i == 0 else "          "
        lines.append(f"{head} {k}  {str(t.dtype).removeprefix('torch.')} {list(t.shape)}")
    if len(shown) < len(state):
        lines.append(f"           ... {len(state) - len(shown)} more (--all lists them)")
    return lines


def _format_line(fmt: str) -> str:
    return {
        "torch zip": "torch.save zip (torch >= 1.6)",
        "torch legacy": "torch.save legacy (torch < 1.6)",
        "safetensors": "safetensors",
    }.get(fmt, fmt)


def prefix_report(keys: list[str]) -> str:
    """Which wrapper prefixes start the keys, and a shared first segment that is not one (opacus `_module.`)."""
    n = len(keys)
    counts = [f"{p} {sum(k.startswith(p) for k in keys)}/{n}" for p in WRAPPER_PREFIXES]
    text = ", ".join(counts)
    if any(k.startswith(WRAPPER_PREFIXES) for k in keys):
        text += " (convert-ckpt strips them at the start of keys)"
    # A wrapper of another kind (opacus's GradSampleModule: `_module.`) prefixes every key with a segment
    # that names a module; it is not DataParallel's, so it is reported and left alone.
    first = {k.split(".", 1)[0] + "." for k in keys}
    if n > 1 and len(first) == 1 and all("." in k for k in keys):
        common = first.pop()
        if common not in WRAPPER_PREFIXES and "mod" in common:
            text += f"; every key starts with {common!r}, left as is (--rename {common}= drops it)"
    return text


def _value_summary(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {str(value.dtype).removeprefix('torch.')} {list(value.shape)}"
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy scalar
        return f"{value.item()!r} ({type(value).__module__}.{type(value).__name__})"
    if isinstance(value, (bool, int, float, str)) or value is None:
        return f"{value!r} ({type(value).__name__})"
    if isinstance(value, argparse.Namespace):
        fields = list(vars(value))
        return f"argparse.Namespace with {len(fields)} fields: {', '.join(fields[:8])}{', ...' if len(fields) > 8 else ''}"
    if isinstance(value, Mapping):
        keys = ", ".join(map(str, list(value)[:6])) + (", ..." if len(value) > 6 else "")
        if is_optimizer_state(value):
            return f"optimizer state dict ({keys}); not converted"
        tensors = "; holds tensors, not converted" if holds_tensors(value) else ""
        return f"{type(value).__name__} with {len(value)} entries ({keys}){tensors}"
    if isinstance(value, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in value})
        return f"{type(value).__name__} of {len(value)} ({', '.join(kinds)})"
    return type(value).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        print("\n".join(describe(args.input, args.key, args.all)))
    except UserError as exc:
        if args.input.is_file():
            fmt = sniff_format(args.input)
            print(
                f"file:      {args.input} ({human(args.input.stat().st_size, 'B')})\nformat:    {_format_line(fmt)}"
            )
            if fmt in ("torch zip", "torch legacy") and (needed := unsafe_globals(args.input, fmt)):
                print(f"needs:     {', '.join(needed)} (not allowed by the safe loader)")
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
