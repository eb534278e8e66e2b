"""Your own model without a recipe: `--model.target mypkg.nets.Net --model.kwargs '{"hidden": 256}'`.

A recipe offers this by giving its model section the two fields of `ModelTarget` and, in `build_model`,
calling `build_from_target` when `target` is set. The target is imported like any Python name (so its package
must be installed or on PYTHONPATH; `python -m` and `accelerate launch -m` also search the current directory)
and called with the keyword arguments. Every way this can go wrong is a `UserError` that names the path and
what failed.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import torch
from torch import nn
from tyro.constructors import PrimitiveConstructorSpec

from launcher.errors import UserError


def _json_object(args: list[str]) -> dict[str, Any]:
    try:
        value = json.loads(args[0])
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc}); write it like '{{\"hidden\": 256}}'") from None
    if not isinstance(value, dict):
        raise ValueError(f"expected a JSON object such as '{{\"hidden\": 256}}', got {args[0]}")
    return value


# A dict field that the command line takes as one JSON object. tyro's own dict syntax (`--model.kwargs hidden
# 256`) cannot type mixed values; JSON can (numbers, strings, lists, booleans, null), and config.json stores a
# real dict.
JsonDict = Annotated[
    dict[str, Any],
    PrimitiveConstructorSpec(
        nargs=1,
        metavar="JSON",
        instance_from_str=_json_object,
        is_instance=lambda value: isinstance(value, dict),
        str_from_instance=lambda value: [json.dumps(value)],
    ),
]


@dataclass(kw_only=True)
class ModelTarget:
    """Model-section fields of a recipe that can build an imported model instead of its own."""

    target: str = ""
    """Import path of a class or function to build instead of the recipe's model, e.g. mypkg.nets.Net."""
    kwargs: JsonDict = field(default_factory=dict)
    """Keyword arguments for --model.target, as one JSON object: --model.kwargs '{"hidden": 256}'."""


def build_from_target(target: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """Import `target` (a dotted path) and call it with `kwargs`; the result must be an nn.Module."""
    kwargs = dict(kwargs or {})
    factory = import_target(target)
    if not callable(factory):
        raise UserError(f"--model.target {target} is a {type(factory).__name__}, not a class or function")
    try:
        signature: inspect.Signature | None = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins and C extensions have none; then the call decides
        signature = None
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as exc:
            raise UserError(
                f"--model.kwargs {json.dumps(kwargs)} do not fit {target}{signature}: {exc}"
            ) from None
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise UserError(
            f"--model.target {target}: building it with --model.kwargs {json.dumps(kwargs)} raised:\n"
            + _user_traceback(exc)
        ) from None
    if not isinstance(model, nn.Module):
        raise UserError(f"--model.target {target} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def import_target(target: str) -> Any:
    """The object a dotted path names: the longest importable module prefix, then attributes (Outer.Inner)."""
    parts = target.split(".")
    if len(parts) < 2 or not all(part.isidentifier() for part in parts):
        raise UserError(
            f"--model.target {target!r} is not a dotted import path: write the module, then the name, "
            "e.g. mypkg.nets.Net"
        )
    missing = ""
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # The module itself (or a package on its path) does not exist: perhaps the tail is attributes
            # (mypkg.nets.Outer.Inner), so try a shorter prefix. A module that exists but imports something
            # missing is a different error, reported below with its traceback.
            if exc.name is not None and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                missing = missing or exc.name
                continue
            raise UserError(
                f"--model.target {target}: module {module_name!r} was found but failed to import:\n"
                + _user_traceback(exc)
            ) from None
        except Exception as exc:
            raise UserError(
                f"--model.target {target}: importing module {module_name!r} raised:\n" + _user_traceback(exc)
            ) from None
        if missing and not hasattr(module, parts[cut]):
            break  # mypkg imports but has no `nets`: the missing module mypkg.nets is the news
        return _attribute_path(module, parts[cut:], target)
    top = missing.split(".")[0]
    raise UserError(
        f"--model.target {target}: cannot import module {'.'.join(parts[:-1])!r}: there is no module named "
        f"{missing!r}. Install its package, or add the folder that holds {top}/ to PYTHONPATH "
        f"(e.g. PYTHONPATH=. when it is in the current directory)"
    )


def _attribute_path(module: Any, names: list[str], target: str) -> Any:
    obj = module
    for i, name in enumerate(names):
        if not hasattr(obj, name):
            owner = ".".join([module.__name__, *names[:i]])
            where = getattr(obj, "__file__", None)
            available = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(name, available, n=3)
            modules = sorted(
                n
                for n in available
                if inspect.isclass(getattr(obj, n)) and issubclass(getattr(obj, n), nn.Module)
            )
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            if modules:
                hint += f" Its nn.Module classes: {', '.join(modules[:20])}"
            raise UserError(
                f"--model.target {target}: module {owner!r}{f' ({where})' if where else ''} has no attribute "
                f"{name!r}{hint}"
            )
        obj = getattr(obj, name)
    return obj


def check_output(model: nn.Module, input_shape: tuple[int, ...], num_classes: int, what: str) -> None:
    """Run one zero image through `model` and check it gives `num_classes` logits: a model imported by path
    meets the data here, with a message that says what to change, instead of in the middle of training.

    The forward runs in eval mode without gradients, so no BatchNorm statistics change. It also initialises
    lazy modules (nn.LazyLinear), which must happen before the optimizer sees the parameters.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, *input_shape))
    except Exception as exc:
        raise UserError(
            f"{what}: a forward pass on one {'x'.join(map(str, input_shape))} image raised:\n"
            + _user_traceback(exc)
        ) from None
    finally:
        model.train(was_training)
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, num_classes):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserError(
            f"{what}: the model must return (batch, {num_classes}) class logits for this data, but gave "
            f"{shape} for one image; e.g. pass --model.kwargs '{{\"num_classes\": {num_classes}}}'"
        )


_IMPORTLIB = str(Path(importlib.__file__).parent)


def _user_traceback(exc: BaseException) -> str:
    """The traceback without importlib's and this file's frames, which only hide where the problem is."""
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(("<frozen", _IMPORTLIB)) and f.filename != __file__
    ]
    lines = ["Traceback (most recent call last):\n", *traceback.format_list(frames)] if frames else []
    lines += traceback.format_exception_only(type(exc), exc)
    return "".join(lines).rstrip()
