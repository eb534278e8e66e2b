"""Run launcher.train with a DDP communication hook that counts gradient all-reduces; rank 0 prints the count.

Usage (under accelerate launch): count_allreduce.py OUT.json RECIPE [overrides...]
"""

import json
import sys

import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

calls = {"allreduce": 0}
_init = DistributedDataParallel.__init__


def _counting_hook(state, bucket):
    calls["allreduce"] += 1
    return default_hooks.allreduce_hook(None, bucket)


def _init_with_hook(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    self.register_comm_hook(None, _counting_hook)


DistributedDataParallel.__init__ = _init_with_hook

if __name__ == "__main__":
    from launcher.train import main

    out, argv = sys.argv[1], sys.argv[2:]
    code = main(argv)
    if (dist.is_initialized() and dist.get_rank() == 0) or not dist.is_initialized():
        with open(out, "w") as f:
            json.dump(calls, f)
    sys.exit(code)
