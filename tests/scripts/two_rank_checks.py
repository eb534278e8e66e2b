"""Checks that need a real process group of 2 (run under `accelerate launch --num_processes 2`); rank 0 writes
the findings as JSON to OUT. Usage: two_rank_checks.py OUT.json MNIST_ROOT

- --compile compiles the DDP-wrapped model (compiled outside, DDP inside), the order DDP's bucketing needs;
- evaluation of a set smaller than the process count (rank 1's share is empty), in memory and streamed.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Subset
from torchvision.datasets import MNIST

from launcher.config import DataConfig, LoggingConfig, TrainConfig
from launcher.data import DeviceTransform, EvalData, Source
from launcher.evaluate import evaluate
from launcher.train import _make_accelerator

out, root = Path(sys.argv[1]), Path(sys.argv[2])
cfg = TrainConfig(
    compile=True, logging=LoggingConfig(trackers=()), data=DataConfig(mean=(0.1307,), std=(0.3081,))
)
accelerator = _make_accelerator(cfg, out.parent)
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
prepared = accelerator.prepare_model(model)
found = {
    "processes": accelerator.num_processes,
    "prepared": type(prepared).__name__,
    "inside": type(getattr(prepared, "_orig_mod", None)).__name__,
    "inside_is_ddp": isinstance(getattr(prepared, "_orig_mod", None), DistributedDataParallel),
}
one_digit = Subset(MNIST(root, train=False), [0])
for in_memory in (True, False):
    source = Source(one_digit, in_memory, accelerator.device, num_workers=0)
    data = EvalData(source, 100, accelerator.num_processes, accelerator.process_index,
                    DeviceTransform(cfg.data, 0, accelerator.device))  # fmt: skip
    result, confusion = evaluate(model, data, accelerator)
    found[f"in_memory={in_memory}"] = {
        **result,
        "confusion_sum": int(confusion.sum()),
        "shape": list(confusion.shape),
    }
image, label = one_digit[0]
x = (torch.tensor(list(image.getdata()), dtype=torch.float32).view(1, 1, 28, 28) / 255 - 0.1307) / 0.3081
with torch.no_grad():
    found["direct_loss"] = F.cross_entropy(model(x), torch.tensor([label])).item()
if accelerator.is_main_process:
    out.write_text(json.dumps(found))
accelerator.wait_for_everyone()
