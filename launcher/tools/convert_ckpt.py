"""`launcher convert-ckpt`: turn any PyTorch checkpoint into a clean state dict, safely.

Steps, in order: read the file without running code from it (launcher.checkpoint.safe_load), pick the weights out of a
wrapper dict (--key), rename key prefixes (--rename), strip `module.`/`_orig_mod.` at the start of keys, add a
prefix (--add-prefix), write the result atomically, read it back and compare every tensor, then optionally load
it into a recipe's model (--check).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import launcher.checkpoint.sharded as sharded
from launcher.checkpoint.format import verify
from launcher.checkpoint.safe_load import Loaded, load_checkpoint, read_safetensors
from launcher.checkpoint.state_dict import (
    add_prefix,
    holds_tensors,
    is_optimizer_state,
    is_state_dict,
    load_into,
    rename_prefix,
    split_weights,
    strip_prefixes,
    untie,
)
from launcher.checkpoint.weights import save_safetensors, weights_file
from launcher.errors import UserError
from launcher.files import write_atomic
from launcher.model_stats import human
from launcher.recipe import load_recipe, parse_config

# A metadata value longer than this (a loss curve of a million steps) is left out rather than bloat the header.
MAX_METADATA_CHARS = 65_536
# Metadata keys convert-ckpt writes itself; checkpoint entries of the same name are stored with a "checkpoint." prefix.
RESERVED_METADATA = ("format", "launcher.")
PT_SUFFIXES = (".pt", ".pth", ".bin", ".tar", ".pkl", ".ckpt")

DESCRIPTION = """\
Convert a PyTorch checkpoint from anywhere into a clean state dict: .safetensors by
default, or a plain .pt. Accepted: DataParallel/DDP `module.` keys, torch.compile
`_orig_mod.` keys, wrapper dicts like {'state_dict': ..., 'epoch': ...}, zip and legacy
torch.save files (Python 2 era included), safetensors, a launcher checkpoint folder.

The file is read with torch.load(weights_only=True) only, so nothing in it runs. Steps,
in order: pick the weights (--key), rename prefixes (--rename), strip `module.` and
`_orig_mod.` at the start of keys (unless --no-strip), add a prefix (--add-prefix).
Non-tensor entries (epoch, accuracy, args) go into the safetensors metadata as strings;
tied tensors are stored once, with their aliases in the metadata. The output is written
to a temporary file, read back and compared tensor by tensor (torch.equal), and only
then renamed into place. The input is never overwritten."""

EXAMPLES = """\
examples:
  launcher convert-ckpt old.pt
      -> old.safetensors, `module.` stripped
  launcher convert-ckpt old.pt --add-prefix module. -o dp.pt --format pt
      -> a plain .pt for code that loads into nn.DataParallel
  launcher convert-ckpt old.pth.tar --key state_dict \\
      --rename features.module.=module.features. --check recipes/mnist.py --model.channels 16
  launcher convert-ckpt runs/mnist/checkpoints/step-00000375 -o mnist.pt
      -> model.load_state_dict(torch.load("mnist.pt", weights_only=True)) in plain PyTorch

exit status: 0 converted (and fits the --check recipe); 1 converted, but does not fit the
--check recipe; 2 bad input (the message says why; nothing is written)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launcher convert-ckpt",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "input",
        type=Path,
        help="checkpoint to convert: a torch.save file (.pt, .pth, .pth.tar, .bin, ...), a .safetensors file, "
        "or a launcher checkpoint folder (step-00001200/). Example: model_best.pth.tar",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        help="where to write (default: INPUT with its extension replaced: old.pth.tar -> old.safetensors, "
        "or old.converted.pt with --format pt). An existing file is only replaced with --overwrite. "
        "Example: -o weights/resnet18.safetensors",
    )
    p.add_argument(
        "--format",
        choices=("safetensors", "pt"),
        help="output format (default: pt when --output ends in .pt/.pth/.bin, else safetensors). A pt file is "
        "a plain state dict that loads with model.load_state_dict(torch.load(path, weights_only=True)); it "
        "cannot carry the metadata. Example: --format pt",
    )
    p.add_argument(
        "--key",
        help="the entry of a wrapper dict that holds the weights, when there is not exactly one known one "
        "(`launcher inspect-ckpt` lists the candidates). Example: --key state_dict_ema",
    )
    p.add_argument(
        "--rename",
        action="append",
        default=[],
        metavar="OLD=NEW",
        help="rewrite the key prefix OLD to NEW, on the keys as stored in the file (before stripping); "
        "repeatable, applied in order; NEW may be empty. Example: --rename _module.= (opacus) or "
        "--rename features.module.=module.features.",
    )
    p.add_argument(
        "--no-strip",
        action="store_true",
        help="keep `module.` and `_orig_mod.` at the start of keys (by default they are stripped, repeatedly: "
        "module._orig_mod.fc.weight -> fc.weight; never in the middle of a key). Example: --no-strip",
    )
    p.add_argument(
        "--add-prefix",
        metavar="PREFIX",
        help="prepend PREFIX to every key after stripping, for code that loads into a wrapped model. "
        "Example: --add-prefix module.",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace OUTPUT if it exists (atomically). The input is never overwritten. Example: --overwrite",
    )
    p.add_argument(
        "--unsafe-load-pickled-code",
        action="store_true",
        help="RISK: if the file cannot be read safely (a whole pickled nn.Module saved with torch.save(model), "
        "or other pickled classes), unpickle it with weights_only=False, which RUNS ANY CODE THE FILE CONTAINS, "
        "and convert the module's state dict. Use only for files you trust. A class defined in the saving "
        "script (`__main__`) cannot be unpickled even so. Example: --unsafe-load-pickled-code",
    )
    p.add_argument(
        "--check",
        metavar="RECIPE [OVERRIDES ...]",
        help="after converting, load the result into RECIPE's model (built with the recipe's config and any "
        "overrides that follow, as for training) and report missing and unexpected keys and shape mismatches. "
        "Must come last: everything after RECIPE goes to the recipe. "
        "Example: --check recipes/mnist.py --model.channels 16",
    )
    return p


# ---- the conversion, as functions of data ------------------------------------------------------------------------
@dataclass
class Converted:
    """The converted state dict and what happened on the way, for the report."""

    state: dict[str, torch.Tensor]
    weights_key: str | None
    metadata: dict[str, str] = field(default_factory=dict)
    """Non-tensor entries as strings (safetensors output only)."""
    left_out: dict[str, str] = field(default_factory=dict)
    """Entries not carried over -> why (optimizer state holds tensors, ...)."""
    changes: list[str] = field(default_factory=list)


def convert_state(
    loaded: Loaded,
    key: str | None = None,
    renames: Sequence[tuple[str, str]] = (),
    strip: bool = True,
    prefix: str | None = None,
    source: str = "checkpoint",
) -> Converted:
    """Pick the weights out of what a file holds and rewrite their keys (rename, strip, add prefix)."""
    weights_key, state, extras = split_weights(loaded.obj, key, source)
    result = Converted(state, weights_key)
    for name, value in {**loaded.metadata, **extras}.items():
        if name in loaded.metadata and (name == "format" or name.startswith("launcher.")):
            continue  # describes the input file (an earlier conversion), not the weights
        text, why = metadata_value(value)
        if text is None:
            result.left_out[str(name)] = why
            continue
        name = str(name)
        result.metadata[f"checkpoint.{name}" if name.startswith(RESERVED_METADATA) else name] = text
    for old, new in renames:
        hits = sum(k.startswith(old) for k in state)
        if hits == 0:
            raise UserError(f"--rename {old}={new}: no key starts with {old!r} (keys: {_first_keys(state)})")
        state = rename_prefix(state, old, new)
        result.changes.append(f"renamed {old!r} -> {new!r} on {hits} keys")
    if strip:
        before = list(state)
        state = strip_prefixes(state)
        removed = Counter(
            old[: len(old) - len(new)] for old, new in zip(before, state, strict=True) if old != new
        )
        for stripped, n in removed.items():
            result.changes.append(f"stripped {stripped!r} from {n} of {len(state)} keys")
    if prefix:
        state = add_prefix(state, prefix)
        result.changes.append(f"added {prefix!r} to {len(state)} keys")
    result.state = state
    return result


def _first_keys(state: Mapping[str, Any], n: int = 3) -> str:
    keys = list(state)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def metadata_value(value: Any) -> tuple[str | None, str]:
    """(a checkpoint entry as a metadata string, or None; why it was left out).

    Scalars become their str(); containers and argparse.Namespace become JSON. Entries that hold tensors
    (optimizer state, normalizer statistics) are left out: metadata is text, and they are not model weights.
    """
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return str(value.item()), ""
    if is_optimizer_state(value):
        return None, "optimizer state, not model weights"
    if holds_tensors(value):
        hint = " (convert it on its own with --key)" if is_state_dict(value) else ""
        return None, f"holds tensors{hint}"
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int, float)):
        text = str(value)
    elif hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        text = str(value.item())  # a numpy scalar
    else:
        # A crafted pickle can nest lists 10^5 deep, and json.dumps recurses once per level.
        try:
            text = json.dumps(value, default=_json_default)
        except RecursionError:
            return None, "nested too deeply to store as text"
    if len(text) > MAX_METADATA_CHARS:
        return None, f"{len(text):,} characters as text, over the {MAX_METADATA_CHARS:,} limit"
    return text, ""


def _json_default(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "shape", None) == ():
        return value.item()
    if isinstance(value, argparse.Namespace):
        return vars(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return repr(value)


def tensors_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, with NaNs in the same places counting as equal (a checkpoint may hold NaN buffers)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if torch.equal(a, b):
        return True
    if a.is_floating_point() or a.is_complex():
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        return torch.equal(nan_a, nan_b) and torch.equal(a[~nan_a], b[~nan_b])
    return False


def compare(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise UserError unless `got` has exactly the keys of `expected`, every tensor equal."""
    if set(expected) != set(got):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise UserError(f"{where}: read back with different keys (missing {missing[:5]}, extra {extra[:5]})")
    for k, t in expected.items():
        if not tensors_equal(t.detach(), got[k]):
            raise UserError(f"{where}: tensor {k!r} differs after reading back")


# ---- writing -----------------------------------------------------------------------------------------------------
def write_verified(
    out: Path, fmt: str, state: Mapping[str, torch.Tensor], metadata: dict[str, str]
) -> tuple[int, dict[str, str], int]:
    """Write `state` to `out` atomically and verify it; returns untie()'s counts (stored, aliases, contiguous).

    The temporary file is written, fsynced, read back and compared before it is renamed to `out`, so `out` is
    either the old file or a complete, verified new one.
    """
    counts: tuple[dict[str, torch.Tensor], dict[str, str], int] = ({}, {}, 0)

    def write(tmp: Path) -> None:
        nonlocal counts
        if fmt == "safetensors":
            counts = save_safetensors(state, tmp, metadata)
        else:
            # Aliases point at the same tensor object, so torch.save stores tied weights once and keeps them tied.
            counts = untie(state)
            stored, aliases, _ = counts
            torch.save({k: stored[aliases.get(k, k)] for k in state}, tmp)

    def check(tmp: Path) -> None:
        if fmt == "safetensors":
            got, _meta = read_safetensors(tmp)
        else:
            got = torch.load(tmp, map_location="cpu", weights_only=True)
        compare(state, got, str(out))
        del got  # drop the memory map of the temporary file before it is renamed

    try:
        write_atomic(out, write, check=check)
    except UserError:
        raise
    except Exception as exc:  # OSError (permissions, disk full) or a dtype safetensors cannot store
        raise UserError(f"cannot write {out}: {exc}") from None
    stored, aliases, contiguous = counts
    return len(stored), aliases, contiguous


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in blocks (the provenance of a converted checkpoint)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def default_output(src: Path, fmt: str) -> Path:
    """old.pth.tar -> old.safetensors (or old.converted.pt), beside the input; a folder -> folder.safetensors."""
    name = src.name
    while Path(name).suffix in (*PT_SUFFIXES, ".safetensors"):
        name = Path(name).stem
    return src.with_name(name + (".safetensors" if fmt == "safetensors" else ".converted.pt"))


def check_recipe(
    state: Mapping[str, torch.Tensor], recipe_argv: Sequence[str], prefix: str | None, source: str
) -> str | None:
    """Load `state` into the recipe's model with strict=True; None if it fits, else what does not fit."""
    recipe = load_recipe(recipe_argv[0])
    cfg = parse_config(recipe, recipe_argv[1:], prog=f"launcher convert-ckpt ... --check {recipe_argv[0]}")
    model = recipe.make_model(cfg)
    # With --add-prefix the output is meant for the wrapped model: check it against the model's keys under it.
    if prefix:
        state = {k[len(prefix) :]: v for k, v in state.items()}
    try:
        load_into(model, state, source=source)
    except UserError as exc:
        return str(exc)
    return None


# ---- the command ---------------------------------------------------------------------------------------------------
def _split_check(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """argv for our parser, and `RECIPE [overrides]` for the recipe's own parser (everything after --check)."""
    for i, arg in enumerate(argv):
        if arg == "--check":
            if i + 1 >= len(argv):
                return argv, None  # argparse reports the missing value
            return [*argv[:i], "--check", argv[i + 1]], argv[i + 1 :]
        if arg.startswith("--check="):
            return [*argv[:i], arg], [arg.split("=", 1)[1], *argv[i + 1 :]]
    return argv, None


def _parse_rename(spec: str) -> tuple[str, str]:
    if "=" not in spec or not spec.split("=", 1)[0]:
        raise UserError(f"--rename {spec!r}: expected OLD=NEW with a non-empty OLD, e.g. --rename _module.=")
    old, new = spec.split("=", 1)
    return old, new


def run(args: argparse.Namespace, recipe_argv: list[str] | None) -> int:
    src: Path = args.input
    shards = src.is_dir() and sharded.is_sharded(src)  # a checkpoint of --parallel.strategy fsdp
    source_file = src / sharded.METADATA if shards else weights_file(src)
    fmt = args.format or (
        "pt" if args.output is not None and args.output.suffix in PT_SUFFIXES else "safetensors"
    )
    out: Path = args.output or default_output(src, fmt)
    if out.exists() and out.samefile(source_file):
        raise UserError(f"{out}: that is the input; choose another output with -o")
    if out.is_dir():
        raise UserError(f"{out}: is a folder; give a file name with -o")
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} exists; pass --overwrite to replace it, or choose another output with -o")
    if not out.parent.is_dir():
        raise UserError(f"{out.parent}: no such folder for the output")

    if shards:
        verify(src)
        loaded = Loaded(
            sharded.read_weights(src), "sharded launcher checkpoint (torch.distributed.checkpoint)"
        )
    else:
        loaded = load_checkpoint(source_file, allow_unsafe=args.unsafe_load_pickled_code)
    renames = [_parse_rename(r) for r in args.rename]
    conv = convert_state(loaded, args.key, renames, not args.no_strip, args.add_prefix, source=str(src))
    size = sum(t.numel() * t.element_size() for t in conv.state.values())
    where = f"weights under {conv.weights_key!r}" if conv.weights_key else "a bare state dict"
    print(f"{src}: {loaded.format}, {where} ({len(conv.state)} tensors, {human(size, 'B')})")
    for line in loaded.notes + conv.changes:
        print(f"  {line}")
    if fmt == "safetensors":
        meta = {
            **conv.metadata,
            "launcher.source": src.name,
            "launcher.source_sha256": sha256_file(source_file),
        }
        if conv.weights_key:
            meta["launcher.weights_key"] = conv.weights_key
        if conv.metadata:
            print(f"  metadata: {', '.join(conv.metadata)}")
    else:
        meta = {}
        if conv.metadata:  # a pt output is a bare state dict, so load_state_dict(torch.load(...)) just works
            print(f"  not carried (a .pt output is a plain state dict): {', '.join(conv.metadata)}")
    for name, why in conv.left_out.items():
        print(f"  not carried: {name} ({why})")
    n_stored, aliases, contiguous = write_verified(out, fmt, conv.state, meta)
    if contiguous:
        print(f"  made contiguous: {contiguous} tensors")
    for alias, target in aliases.items():
        print(f"  tied: {alias!r} is {target!r}, stored once")
    print(
        f"wrote {out}: {n_stored} tensors, {human(out.stat().st_size, 'B')}; "
        f"read back: all {len(conv.state)} equal (torch.equal)"
    )

    if recipe_argv is not None:
        problem = check_recipe(conv.state, recipe_argv, args.add_prefix, source=str(out))
        if problem:
            print(f"check {recipe_argv[0]}: {problem}", file=sys.stderr)
            return 1
        print(f"check {recipe_argv[0]}: loads into the recipe's model with strict=True")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, recipe_argv = _split_check(argv)
    args = build_parser().parse_args(ours)
    try:
        return run(args, recipe_argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
