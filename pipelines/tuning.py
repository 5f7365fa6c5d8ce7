"""Machine-dependent pipeline settings: what ``data.num_threads``, ``data.hw_decoder_load``
and ``data.output_dtype`` set to ``auto`` become on this machine.

The rules come from measurements with ``scripts/bench_pipeline.py`` (docs/PERFORMANCE.md,
"Tuning"): on the GPU path the CPU threads only read files, parse JPEG headers and
draw random parameters, so more threads than about 8 per GPU made the pipeline
*slower* (contention with the trainer's own thread and the decoder's CPU stage);
on the CPU path DALI does all the work, so every core it can get helps.
"""
from __future__ import annotations

import os

import torch

from mscn.machine import usable_cores  # the one definition; the benchmarks import it from here too

# GPUs with a hardware JPEG decoder (NVJPG engines), by CUDA compute capability:
# A100/A30 (8.0), Jetson Orin (8.7), H100/H200/GH200 (9.0), B200/GB200 (10.0).
HW_JPEG_CAPABILITIES = {(8, 0), (8, 7), (9, 0), (10, 0)}
GPU_MAX_THREADS = 8  # beyond this, more DALI threads were slower on a 16-core H100/H200 box
HYBRID_LOAD = 0.65  # DALI's own default: the share the hardware decoder gets when it has a partner


def processes_per_node() -> int:
    """Processes sharing this machine's cores: torchrun's LOCAL_WORLD_SIZE, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def dali_threads(setting: int | str, on_gpu: bool) -> int:
    """``data.num_threads``: an integer is kept; "auto" is this process's share of the cores,
    capped at :data:`GPU_MAX_THREADS` on the GPU path."""
    if setting != "auto":
        return int(setting)
    share = max(1, usable_cores() // processes_per_node())
    return max(1, min(share, GPU_MAX_THREADS)) if on_gpu else share


def has_hw_jpeg_decoder(device: torch.device | int | None) -> bool:
    if device is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) in HW_JPEG_CAPABILITIES


def decoder_load(setting: float | str, device: torch.device | int | None) -> float:
    """``data.hw_decoder_load``: a number is kept; "auto" is 1.0 on GPUs with a hardware
    JPEG decoder (every JPEG goes to the NVJPG engines, so the hybrid decoder's CUDA
    kernels stay off the SMs the trainer needs), else DALI's default 0.65 (ignored there)."""
    if setting != "auto":
        return float(setting)
    return 1.0 if has_hw_jpeg_decoder(device) else HYBRID_LOAD


def view_dtype(setting: str, on_gpu: bool) -> str:
    """``data.output_dtype``: "auto" is float16 on the GPU path (half the bytes of every
    view copy, mask fill and DALI output buffer; exact enough for high-passed views,
    see docs/PERFORMANCE.md) and float32 on the CPU path (no cast there)."""
    if setting != "auto":
        return setting
    return "float16" if on_gpu else "float32"


def executor(op_concurrency: str, stream_policy: str, thread_affinity: bool = False) -> dict:
    """``data.op_concurrency``, ``data.stream_policy`` and ``data.thread_affinity`` as keyword
    arguments of a DALI pipeline (``concurrency=``, ``stream_policy=``, ``set_affinity=``;
    DALI's pipelines leave their threads unpinned by default); "auto" leaves DALI's own default
    (operators of different backends at once, one stream per backend) on both paths, until
    a GPU run (``gpu_check.sh 3``, ``masks-concurrent``) shows another is faster there (a
    GPU-only rule would then take the path from :func:`~mscn.pipelines.loader.plan`).

    Why it is a knob: on an H200 the full GPU pipeline kept the GPU busy 28 % of each batch
    (docs/perf/HISTORY.md, round 3). It was host-bound, and with DALI's default concurrency
    the four views' GPU operators run their host side one after another. ``full`` lets
    independent branches (the views) run at once, and ``per_operator`` gives them their own
    streams. The CPU path is unaffected: DALI runs CPU operators one at a time whatever the
    setting, each over its thread pool. The outputs are the same bit for bit
    (tests/test_pipeline_executor.py; its GPU test passed on an H200 in round 4). Round 4
    found no speed difference it could resolve between the settings, so ``auto`` stays
    DALI's default (docs/PERFORMANCE.md).
    """
    from nvidia.dali.pipeline import OperatorConcurrency, StreamPolicy

    kwargs = {}
    if op_concurrency != "auto":
        kwargs["concurrency"] = OperatorConcurrency[op_concurrency.upper()]
    if stream_policy != "auto":
        kwargs["stream_policy"] = StreamPolicy[stream_policy.upper()]
    if thread_affinity:
        kwargs["set_affinity"] = True
    return kwargs
