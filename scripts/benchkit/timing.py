"""The one timing loop of the benchmarks: timed windows of steps and what they cost.

A *step* is any callable that produces one batch and returns how many images (or
items) it produced, so ``measure`` times the DALI stages, the torchvision reference,
training steps (``bench_pipeline.py``), the mask kernels (``bench_masks.py``) and the
GPU check's pipelines (``gpu_pipeline_check.py``) alike.

Timing rules (nanoGPT ``bench.py``): warm-up steps first, then ``repeats`` windows of
``iters`` steps each; ``sync()`` runs before every clock read, so a window never ends
while its steps' GPU work is still running (:func:`device_sync`: the current torch
stream, or the whole device, DALI's streams included). Rates are reported as the median
and the spread (min/max and the quartiles) over windows.
"""
from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from mscn.errors import ConfigError
from mscn.pipelines.tuning import usable_cores

# DALI 2.4 has no public device-memory statistics call: ``Pipeline.executor_statistics``
# needs ``exec_dynamic=False`` (another executor than the one we time) and reports
# per-operator output buffers only. The device-wide figure from cudaMemGetInfo does
# include DALI's memory pool, since the pool is allocated by this process.
DALI_MEMORY_NOTE = ("DALI 2.4 exposes no device-memory statistics API; its pool is "
                    "included in device_used_bytes (cudaMemGetInfo)")


def no_sync() -> None:
    """The CPU path has nothing queued asynchronously once a step returns."""


SYNC_SCOPES = ("stream", "device")


def device_sync(device: torch.device, scope: str) -> Callable[[], None]:
    """A clock-read barrier for ``device``; nothing on the CPU.

    ``device``: cudaDeviceSynchronize, which also waits for every other stream: DALI's,
    including the GPU work of the batches it is prefetching for the *next* window. That
    tail then runs alone instead of beside the consumer (the trainer), and the next window
    starts with it done: the window loses the overlap, between nothing and the whole tail.
    ``stream``: the current torch stream only: the steps' own work (training kernels, the
    loader's filters, casts and masks). Their DALI inputs are complete before that: DALI's
    outputs are taken host-synchronized (``share_outputs``/``run`` without a stream) and,
    with the dynamic executor, handed over without a copy (DLPack). DALI's prefetch runs on
    across the boundary, as it does between any two steps.
    """
    if scope not in SYNC_SCOPES:
        raise ValueError(f"sync scope {scope!r}: must be one of {', '.join(SYNC_SCOPES)}")
    if device.type != "cuda":
        return no_sync
    if scope == "stream":
        return lambda: torch.cuda.current_stream(device).synchronize()
    return lambda: torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------
# CPU time of this process and its children (DataLoader workers are child processes)
# ----------------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces
    return int(rest[11]) + int(rest[12])  # utime + stime (fields 14 and 15 of proc(5))


def _proc_children(pid: int) -> list[int]:
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            kids += [int(k) for k in f.read().split()]
    return kids


def process_tree_cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads, so DALI's too) and its
    live descendants. Workers that already exited are not counted, which is why the
    harness reads it around the timed windows only, while the workers are alive."""
    try:
        total, todo, seen = 0, [os.getpid()], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                total += _proc_ticks(pid)
                todo += _proc_children(pid)
            except (FileNotFoundError, ProcessLookupError):  # exited between two reads
                continue
        return total / _TICKS
    except OSError:  # no /proc (macOS) or no children files: reaped children only
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


# ----------------------------------------------------------------------------------
# Statistics and one timed measurement
# ----------------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    """Median, min/max and quartiles of ``values`` (rounded for humans and JSON)."""
    a = np.asarray(values, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"median": round(float(med), 2), "min": round(float(a.min()), 2), "max": round(float(a.max()), 2),
            "q1": round(float(q1), 2), "q3": round(float(q3), 2), "n": int(a.size)}


@dataclass
class Measurement:
    """The timed windows of one configuration and the resources they used."""

    name: str
    views: int  # views per image, to report views/s
    window_s: list[float] = field(default_factory=list)
    window_images: list[int] = field(default_factory=list)
    cpu_seconds: float = 0.0
    cores: int = 1
    build_s: float = 0.0  # pipeline/model construction + warm-up, not in the rates
    cpu_wall_s: float = 0.0  # wall time over which cpu_seconds was read (the windows and the syncs between them)
    gpu_memory: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def rates(self) -> list[float]:
        return [n / t for n, t in zip(self.window_images, self.window_s)]

    @property
    def median_rate(self) -> float:
        return float(np.median(self.rates))

    @property
    def cpu_util(self) -> float:
        """Process-tree CPU time / (wall time x usable cores): 1.0 = every core busy. The wall
        time is the one the CPU time was read over: the windows alone leave out the syncs
        between them, whose CPU time is counted (it read above 1.0)."""
        return self.cpu_seconds / ((self.cpu_wall_s or sum(self.window_s)) * self.cores)

    def to_dict(self) -> dict:
        rates = self.rates
        return {"name": self.name, "images_per_s": spread(rates),
                "views_per_s": spread([r * self.views for r in rates]),
                "window_s": [round(t, 6) for t in self.window_s], "window_images": self.window_images,
                "wall_s": round(sum(self.window_s), 3), "build_s": round(self.build_s, 3),
                "cpu_seconds": round(self.cpu_seconds, 3), "cpu_wall_s": round(self.cpu_wall_s, 3), "cores": self.cores,
                "cpu_util": round(self.cpu_util, 3), "gpu_memory": self.gpu_memory, **self.extra}


def measure(name: str, step: Callable[[], int], *, views: int, warmup: int, iters: int, repeats: int,
            sync: Callable[[], None] = no_sync, device: torch.device | None = None,
            build_s: float = 0.0) -> Measurement:
    """Run ``warmup`` steps, then ``repeats`` windows of ``iters`` steps, syncing before every clock read.

    ``step()`` produces one batch and returns its number of images (the last batch of a
    non-looping reader may be short). CPU time is read around all windows together.
    """
    if iters < 1 or repeats < 1 or warmup < 0:
        raise ConfigError(f"{name}: need --iters >= 1, --repeats >= 1, --warmup >= 0")
    cuda = device is not None and device.type == "cuda"
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync()
    if cuda:  # the peak of the timed windows, not of whatever ran before
        torch.cuda.reset_peak_memory_stats(device)
    m = Measurement(name, views, cores=usable_cores(), build_s=build_s + time.perf_counter() - t0)
    cpu0, wall0 = process_tree_cpu_seconds(), time.perf_counter()
    for _ in range(repeats):
        sync()
        start, n = time.perf_counter(), 0
        for _ in range(iters):
            n += step()
        sync()  # wait for the window's GPU work before reading the clock
        m.window_s.append(time.perf_counter() - start)
        m.window_images.append(n)
    m.cpu_seconds = process_tree_cpu_seconds() - cpu0
    m.cpu_wall_s = time.perf_counter() - wall0
    m.gpu_memory = gpu_memory(device) if cuda else None
    return m


def device_used_bytes(device: torch.device) -> int | None:
    """Device-wide memory in use (cudaMemGetInfo: DALI's pool included); None off CUDA."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free


def gpu_memory(device: torch.device) -> dict:
    """Peak torch allocations during the windows, and the device-wide use (DALI's pool included)."""
    free, total = torch.cuda.mem_get_info(device)
    return {"torch_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "torch_max_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "device_used_bytes": total - free, "device_total_bytes": total, "dali": DALI_MEMORY_NOTE}



def per_step_ms(m: Measurement, iters: int) -> float:
    """Median wall time of one step in ms (a window is ``iters`` steps)."""
    return float(np.median(m.window_s)) / iters * 1e3
