"""launcher.throughput: the peak table by device name, MFU arithmetic, the 3x training-FLOPs rule, peak memory."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from launcher.model_stats import forward_flops
from launcher.throughput import (
    GPUS,
    achieved_tflops,
    find_gpu,
    format_mfu,
    lookup,
    mfu,
    peak_memory,
    peak_tflops,
    reset_peak_memory,
    training_flops,
)


@pytest.mark.parametrize(
    ("name", "precision", "tf32", "expected"),
    [
        # Names as torch.cuda.get_device_name() reports them.
        ("NVIDIA H100 80GB HBM3", "bf16", False, 989.4),  # SXM
        ("NVIDIA H100 80GB HBM3", "no", False, 67.0),
        ("NVIDIA H100 80GB HBM3", "no", True, 494.7),
        ("NVIDIA H100 PCIe", "bf16", False, 756.5),
        ("NVIDIA H100 NVL", "fp16", False, 835.5),
        ("NVIDIA H200", "bf16", False, 989.4),
        ("NVIDIA H200 NVL", "bf16", False, 835.5),
        ("NVIDIA GH200 480GB", "bf16", False, 989.4),
        ("NVIDIA A100-SXM4-80GB", "bf16", False, 312.0),
        ("NVIDIA A100-SXM4-40GB", "no", True, 156.0),
        ("NVIDIA A100-PCIE-40GB", "no", False, 19.5),
        ("NVIDIA A100 80GB PCIe", "fp16", False, 312.0),
        ("NVIDIA L4", "bf16", False, 121.0),
        ("NVIDIA L40S", "bf16", False, 362.05),
        ("NVIDIA L40", "bf16", False, 181.05),
        ("NVIDIA A10G", "bf16", False, 125.0),
        ("NVIDIA A10", "no", True, 62.5),
        ("NVIDIA GeForce RTX 4090", "bf16", False, 165.2),
        ("NVIDIA GeForce RTX 3090", "fp16", False, 71.0),
        ("Tesla V100-SXM2-16GB", "fp16", False, 125.0),
        ("Tesla V100-PCIE-32GB", "no", True, 14.0),  # no TF32 before Ampere: the FP32 figure
        ("Tesla V100S-PCIE-32GB", "fp16", False, 130.0),
        ("Tesla T4", "fp16", False, 65.0),
    ],
)
def test_lookup_by_device_name(name: str, precision: str, tf32: bool, expected: float) -> None:
    assert lookup(name, precision, tf32) == expected


@pytest.mark.parametrize(
    "name", ["NVIDIA GeForce RTX 3090 Ti", "NVIDIA GeForce RTX 4090 D", "NVIDIA RTX A6000", "NVIDIA B200", ""]
)
def test_unknown_gpus_have_no_peak(name: str) -> None:
    assert find_gpu(name) is None
    assert lookup(name, "bf16") is None


def test_no_bf16_figure_where_there_are_no_bf16_tensor_cores() -> None:
    assert lookup("Tesla V100-SXM2-16GB", "bf16") is None
    assert lookup("Tesla T4", "bf16") is None


def test_every_entry_is_dense_and_consistent() -> None:
    for pattern, peak in GPUS:
        assert peak.fp32 > 0, pattern
        for reduced in (peak.tf32, peak.bf16, peak.fp16):
            assert reduced is None or reduced >= peak.fp32, pattern
        # No tensor-core figure above 1,000 dense TFLOP/s in this generation: a sparse one slipped in.
        assert max(v for v in (peak.tf32, peak.bf16, peak.fp16) if v is not None) < 1000, pattern


def test_bad_precision_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        lookup("NVIDIA H100 PCIe", "fp8")


def test_cpu_has_no_peak_unless_overridden() -> None:
    cpu = torch.device("cpu")
    assert peak_tflops(cpu, "no") is None
    assert peak_tflops(cpu, "bf16") is None
    assert peak_tflops(cpu, "bf16", override=123.0) == 123.0
    with pytest.raises(ValueError, match="must be positive"):
        peak_tflops(cpu, "bf16", override=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_override_wins_on_a_gpu() -> None:
    assert peak_tflops(torch.device("cuda"), "bf16", override=1.5) == 1.5


def test_mfu_arithmetic() -> None:
    # 100 steps of 6e12 FLOPs in 2 s: 300 TFLOP/s, 30% of a 1,000 TFLOP/s peak.
    assert achieved_tflops(6e12, 100, 2.0) == pytest.approx(300.0)
    assert mfu(6e12, 100, 2.0, 1000.0) == pytest.approx(0.30)
    assert mfu(6e12, 100, 2.0, None) is None
    assert mfu(6e12, 0, 0.0, 1000.0) is None
    assert format_mfu(0.30) == "30.0%"
    assert format_mfu(None) == "n/a"


def test_training_flops_are_three_forwards_as_counted_by_the_flop_counter() -> None:
    """The 3x rule against torch's own count of a forward and backward pass: for a stack of layers it overcounts
    only the gradient of the first layer's input, which is never computed."""
    torch.manual_seed(0)
    width, depth = 64, 4
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(depth)))
    x = torch.randn(1, width)
    forward = forward_flops(model, x)
    assert forward == depth * 2 * width * width
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    counted = counter.get_total_flops()
    assert training_flops(forward) == 3 * forward
    assert counted == training_flops(forward) - 2 * width * width  # no gradient for the input
    assert training_flops(forward, samples=8) == 8 * training_flops(forward)


def test_peak_rss_is_positive_and_grows_after_a_big_allocation() -> None:
    # In a fresh process: in this one, an earlier test's peak may already be above what the allocation reaches.
    script = """
import json, torch
from launcher.throughput import peak_memory, peak_rss_bytes, reset_peak_memory
before = peak_rss_bytes()
big = torch.ones(256 * 2**20, dtype=torch.uint8)  # 256 MiB, touched
after = peak_rss_bytes()
del big
reset_peak_memory(torch.device("cpu"))  # a no-op on CPU: the peak stays
print(json.dumps([before, after, peak_memory(torch.device("cpu")), peak_rss_bytes()]))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    before, after, memory, last = json.loads(done.stdout.splitlines()[-1])
    assert before > 0
    assert after >= before + 200 * 2**20
    assert set(memory) == {"rss_peak_gb"} and memory["rss_peak_gb"] == pytest.approx(after / 1e9, rel=0.01)
    assert last >= after - 4 * 2**20  # the kernel syncs per-thread RSS counters lazily: a few pages of slack


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_cuda_peak_memory_and_reset() -> None:
    device = torch.device("cuda")
    reset_peak_memory(device)
    big = torch.ones(2**28, dtype=torch.uint8, device=device)
    memory = peak_memory(device)
    assert set(memory) == {"mem_alloc_gb", "mem_reserved_gb"}
    assert memory["mem_alloc_gb"] >= 2**28 / 1e9
    assert memory["mem_reserved_gb"] >= memory["mem_alloc_gb"]
    del big
    torch.cuda.empty_cache()
    reset_peak_memory(device)
    assert peak_memory(device)["mem_alloc_gb"] < 2**28 / 1e9
    assert math.isfinite(peak_memory(device)["mem_reserved_gb"])
