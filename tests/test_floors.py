"""What sets the dependency floors of pyproject.toml: one test per feature, naming the oldest release that has it.

`.ci/floor` runs these (with a smoke subset of the suite) against exactly the floor versions, so a floor set too
low fails there; in the main suite they pass trivially. See .ci/floor-constraints.txt for the floors themselves.
"""

from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass

import numpy as np
import torch
import tyro
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from launcher.checkpoint.safe_load import load_checkpoint


def test_torch_safe_globals_takes_stand_ins_under_the_names_a_file_uses(tmp_path):
    """torch >= 2.6: `torch.serialization.safe_globals(...)` with `(stand-in, "numpy.core.multiarray.scalar")`
    entries, which is how safe_load reads the numpy scalars and argparse.Namespace of a typical old checkpoint
    without unpickling any code (torch 2.5 accepts only the real callables)."""
    path = tmp_path / "model_best.pth.tar"
    state = {"w": torch.arange(4.0)}
    torch.save({"state_dict": state, "best_acc1": np.float64(0.75), "args": argparse.Namespace(lr=0.1)}, path)
    obj = load_checkpoint(path).obj
    assert isinstance(obj["best_acc1"], np.float64) and obj["best_acc1"] == 0.75
    assert obj["args"].lr == 0.1
    torch.testing.assert_close(obj["state_dict"]["w"], state["w"])


def test_torch_fsdp2_and_distributed_checkpoint_api():
    """torch >= 2.9: FSDP2 at its public path (torch.distributed.fsdp.fully_shard, public from 2.6), and
    `dcp.async_save(no_dist=...)` (2.9), which sharded checkpoints use for async saves. Two-process FSDP on gloo
    (tests/test_fsdp.py) also needs 2.9: 2.6 cannot run FSDP2 on CPU at all ('Stream' object has no attribute
    'record_event'), and 2.7-2.8 train 2 sharded processes ~2.5e-6 (relative) away from one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    import launcher.checkpoint.sharded
    import launcher.parallel

    assert fully_shard is launcher.parallel.fully_shard and FSDPModule and MixedPrecisionPolicy
    assert "no_dist" in inspect.signature(dcp.async_save).parameters
    assert "no_dist" in inspect.signature(dcp.save).parameters and launcher.checkpoint.sharded.dcp is dcp


def test_accelerate_unwraps_a_compiled_model_on_request():
    """accelerate >= 1.3: `unwrap_model(model, keep_torch_compile=False)`, which the checkpoints and the evaluation
    use to reach the plain module under torch.compile (nothing is compiled here: compilation waits for a call).
    The floor is 1.8, for the trackers: from 1.8 a tracker starts (wandb.init) in `init_trackers`, where
    launcher.trackers turns a failed start into a one-line error (tests/test_trackers.py); before, it started when
    built, and a W&B without login ended in a traceback."""
    model = torch.nn.Linear(2, 2)
    accelerator = Accelerator(cpu=True)
    try:
        assert accelerator.unwrap_model(torch.compile(model), keep_torch_compile=False) is model
    finally:
        AcceleratorState._reset_state(reset_partial_state=False)


@dataclass
class _Eps:
    eps: float = 1e-8


def test_tyro_reads_a_negative_number_in_scientific_notation_as_a_value():
    """tyro >= 1.0: `--optim.eps -1e-8` is a value (then refused by the range check with a message naming the
    flag); tyro 0.9 takes `-1e-8` for a flag and fails with a usage error instead."""
    assert tyro.cli(_Eps, args=["--eps", "-1e-8"], console_outputs=False).eps == -1e-8
