"""How fast a run trains against what its hardware could do: peak dense TFLOP/s of common GPUs, model FLOPs
utilisation (MFU), and the peak memory of the process.

FLOPs of a training step. `launcher.model_stats.forward_flops` counts ONE FORWARD pass of one sample, in eval mode
under no_grad (torch.utils.flop_counter: matmuls, convolutions and attention, a multiply-add as 2 FLOPs; attention
is counted in full, causal mask or not, as nanoGPT and PaLM's MFU do). The backward pass computes two products per
forward matmul (the gradient of the input and of the weight), so a training step costs about 3x the forward
(`training_flops`); this is the usual estimate (6N per token for a transformer's weights) and what MFU uses here.
It slightly overcounts the first layer, whose input needs no gradient, and leaves out recomputation.

Peaks are the vendors' datasheet figures for DENSE tensor math (the datasheets print the 2:4-sparsity figure, twice
as large, first). An unknown GPU, or a CPU, has no peak: MFU is then None ("n/a") rather than a guess, and
`--logging.peak-tflops` supplies one.
"""

from __future__ import annotations

import re
import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

PRECISIONS = ("no", "bf16", "fp16")  # TrainConfig.mixed_precision


@dataclass(frozen=True)
class Peak:
    """Dense peak TFLOP/s of one GPU model. None: no tensor cores for that type (the GPU then emulates it or runs
    it at its plain FP32 rate, and an MFU against either figure would mislead)."""

    fp32: float  # CUDA cores, no tensor cores
    tf32: float | None  # FP32 matmuls on tensor cores (Ampere and later, when allowed)
    bf16: float | None  # tensor cores, FP32 accumulation (what autocast's matmuls use)
    fp16: float


# Sources (the dense column of each; "*" figures in the datasheets are with sparsity):
# A100 (SXM and PCIe print the same): nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
#   nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf
# H100 SXM / PCIe / NVL: resources.nvidia.com/en-us-tensor-core/nvidia-tensor-core-gpu-datasheet (NVL per GPU)
# H200 SXM / NVL: nvidia.com/en-us/data-center/h200 (the H100's compute, more memory); GH200: the H100 SXM's
# L4, L40, L40S: their product pages' datasheets; A10, A40: their datasheets (A10: .../a10/pdf/a10-datasheet.pdf)
# A10G: AWS's variant of the A10 (g5 instances) has no datasheet of its own; the A10's figures, an upper bound
# RTX 4090: Ada architecture whitepaper, appendix (FP16/BF16 tensor with FP32 accumulate: half the FP16-accumulate
#   rate on GeForce cards); RTX 3090: Ampere GA102 whitepaper, appendix (the same rule)
# V100 SXM2 / PCIe / V100S: images.nvidia.com/content/technologies/volta/pdf/
#   volta-v100-datasheet-update-us-1165301-r5.pdf; T4: .../tesla-t4/t4-tensor-core-datasheet-951643.pdf
H100_SXM = Peak(fp32=67.0, tf32=494.7, bf16=989.4, fp16=989.4)
H100_NVL = Peak(fp32=60.0, tf32=417.5, bf16=835.5, fp16=835.5)
A10 = Peak(fp32=31.2, tf32=62.5, bf16=125.0, fp16=125.0)

# First match wins, on the lower-cased name without "NVIDIA", "GeForce" and "Tesla". torch.cuda.get_device_name()
# gives e.g. "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA H100 PCIe", "NVIDIA A100-SXM4-80GB", "Tesla V100-SXM2-16GB".
GPUS: tuple[tuple[str, Peak], ...] = (
    (r"\bgh200\b", H100_SXM),
    (r"\bh200 nvl\b", H100_NVL),
    (r"\bh200\b", H100_SXM),
    (r"\bh100 nvl\b", H100_NVL),
    (r"\bh100\b.*\b(pcie|hbm2e)\b", Peak(fp32=51.0, tf32=378.0, bf16=756.5, fp16=756.5)),
    (r"\bh100\b", H100_SXM),
    (r"\ba100\b", Peak(fp32=19.5, tf32=156.0, bf16=312.0, fp16=312.0)),
    (r"\ba10g\b", A10),
    (r"\ba10\b", A10),
    (r"\ba40\b", Peak(fp32=37.4, tf32=74.8, bf16=149.7, fp16=149.7)),
    (r"\bl40s\b", Peak(fp32=91.6, tf32=183.0, bf16=362.05, fp16=362.05)),
    (r"\bl40\b", Peak(fp32=90.5, tf32=90.5, bf16=181.05, fp16=181.05)),
    (r"\bl4\b", Peak(fp32=30.3, tf32=60.0, bf16=121.0, fp16=121.0)),
    (r"^rtx 4090$", Peak(fp32=82.6, tf32=82.6, bf16=165.2, fp16=165.2)),  # not the 4090 D
    (r"^rtx 3090$", Peak(fp32=35.6, tf32=35.6, bf16=71.0, fp16=71.0)),  # not the 3090 Ti
    (r"\bv100s\b", Peak(fp32=16.4, tf32=None, bf16=None, fp16=130.0)),
    (r"\bv100\b.*\bpcie\b", Peak(fp32=14.0, tf32=None, bf16=None, fp16=112.0)),
    (r"\bv100\b", Peak(fp32=15.7, tf32=None, bf16=None, fp16=125.0)),
    (r"\bt4\b", Peak(fp32=8.1, tf32=None, bf16=None, fp16=65.0)),
)


def find_gpu(name: str) -> Peak | None:
    """The table's entry for a device name as torch.cuda.get_device_name() gives it; None if it is not listed."""
    key = re.sub(r"\b(nvidia|geforce|tesla)\b", " ", name.lower())
    key = " ".join(key.split())
    return next((peak for pattern, peak in GPUS if re.search(pattern, key)), None)


def lookup(name: str, precision: str, tf32: bool = False) -> float | None:
    """Dense peak TFLOP/s of the GPU called `name` for a run in `precision` (TrainConfig.mixed_precision): "no"
    is FP32, or TF32 when `tf32` (FP32 matmuls allowed on tensor cores) and the GPU has it; None if unknown."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    peak = find_gpu(name)
    if peak is None:
        return None
    if precision == "no":
        return peak.tf32 if tf32 and peak.tf32 is not None else peak.fp32
    return peak.bf16 if precision == "bf16" else peak.fp16


def peak_tflops(device: torch.device, precision: str, override: float | None = None) -> float | None:
    """Dense peak TFLOP/s of `device` for a run in `precision`: `override` (--logging.peak-tflops) when given,
    else the table's figure for a CUDA device; None on a CPU or an unlisted GPU. In FP32 ("no") the TF32 figure
    counts only when torch.backends.cuda.matmul.allow_tf32 is on (torch.set_float32_matmul_precision("high"));
    cuDNN's own TF32 switch for convolutions, on by default, is not consulted."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"a peak of {override} TFLOP/s: it must be positive")
        return float(override)
    if device.type != "cuda":
        return None
    return lookup(torch.cuda.get_device_name(device), precision, tf32=torch.backends.cuda.matmul.allow_tf32)


def training_flops(forward_flops: float, samples: float = 1) -> float:
    """FLOPs of training on `samples` samples (forward + backward), from the forward FLOPs of one sample that
    launcher.model_stats.forward_flops counts: 3x (the backward pass is about twice the forward)."""
    return 3.0 * forward_flops * samples


def achieved_tflops(flops_per_step: float, steps: float, seconds: float) -> float:
    """TFLOP/s done: `steps` steps of `flops_per_step` FLOPs each in `seconds`."""
    return flops_per_step * steps / seconds / 1e12


def mfu(flops_per_step: float, steps: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation, a fraction of `peak` TFLOP/s: `steps` steps of `flops_per_step` FLOPs (forward +
    backward, per device) in `seconds`. None when the peak is unknown (or no time has passed)."""
    if peak is None or seconds <= 0:
        return None
    return achieved_tflops(flops_per_step, steps, seconds) / peak


def format_mfu(value: float | None) -> str:
    """ "41.3%", or "n/a" without a peak."""
    return "n/a" if value is None else f"{100 * value:.1f}%"


# ---- memory ----------------------------------------------------------------------------------------------------
def peak_rss_bytes() -> int:
    """The process's peak resident memory since it started, in bytes; the peak cannot be reset. On Linux the
    high-water mark of its own memory (VmHWM): ru_maxrss there survives exec, so a process started by a big one
    (a launcher, pytest) would report its parent's peak. Elsewhere ru_maxrss (bytes on macOS)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak memory in GB (1e9 bytes), named for logging: on a CUDA device the most its tensors took
    (`mem_alloc_gb`: torch.cuda.max_memory_allocated) and the most the caching allocator held (`mem_reserved_gb`)
    since the last `reset_peak_memory`; elsewhere the process's peak resident memory (`rss_peak_gb`)."""
    if device.type == "cuda":
        return {
            "mem_alloc_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
        }
    return {"rss_peak_gb": peak_rss_bytes() / 1e9}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak (CUDA); a no-op elsewhere, where the peak RSS is the process's since it started."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
