"""Measurement harness of ``scripts/bench_pipeline.py``: timed windows and what they cost.

The benchmark answers "is pretraining input-bound on this box?" for the MSCN input
pipeline (decode -> views -> high-pass, paper §5.1 -> masks, §5.2). A *step* is any
callable that produces one batch and returns how many images it produced, so one
harness times the DALI stages, the torchvision reference and training steps alike;
the step builders for the stages and the baseline are at the end of this file.

Timing rules (nanoGPT ``bench.py``): warm-up steps first, then ``repeats`` windows of
``iters`` steps each; ``sync()`` (``torch.cuda.synchronize`` on GPU, which waits for
DALI's streams too: it is device-wide) runs before every clock read, so a window
never ends while queued GPU work is still running. Rates are reported as the median
and the spread (min/max and the quartiles) over windows.
"""
from __future__ import annotations

import importlib
import itertools
import os
import platform
import resource
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mscn.errors import ConfigError

# DALI 2.4 has no public device-memory statistics call: ``Pipeline.executor_statistics``
# needs ``exec_dynamic=False`` (another executor than the one we time) and reports
# per-operator output buffers only. The device-wide figure from cudaMemGetInfo does
# include DALI's memory pool, since the pool is allocated by this process.
DALI_MEMORY_NOTE = ("DALI 2.4 exposes no device-memory statistics API; its pool is "
                    "included in device_used_bytes (cudaMemGetInfo)")


def no_sync() -> None:
    """The CPU path has nothing queued asynchronously once a step returns."""


def device_sync(device: torch.device) -> Callable[[], None]:
    """A clock-read barrier for ``device``: cudaDeviceSynchronize on CUDA, nothing on CPU."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return no_sync


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


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


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
        """Process-tree CPU time / (wall time x usable cores): 1.0 = every core busy."""
        return self.cpu_seconds / (sum(self.window_s) * self.cores)

    def to_dict(self) -> dict:
        rates = self.rates
        return {"name": self.name, "images_per_s": spread(rates),
                "views_per_s": spread([r * self.views for r in rates]),
                "window_s": [round(t, 6) for t in self.window_s], "window_images": self.window_images,
                "wall_s": round(sum(self.window_s), 3), "build_s": round(self.build_s, 3),
                "cpu_seconds": round(self.cpu_seconds, 3), "cores": self.cores,
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
    cpu0 = process_tree_cpu_seconds()
    for _ in range(repeats):
        sync()
        start, n = time.perf_counter(), 0
        for _ in range(iters):
            n += step()
        sync()  # wait for the window's GPU work before reading the clock
        m.window_s.append(time.perf_counter() - start)
        m.window_images.append(n)
    m.cpu_seconds = process_tree_cpu_seconds() - cpu0
    m.gpu_memory = gpu_memory(device) if cuda else None
    return m


def gpu_memory(device: torch.device) -> dict:
    """Peak torch allocations during the windows, and the device-wide use (DALI's pool included)."""
    free, total = torch.cuda.mem_get_info(device)
    return {"torch_max_allocated_bytes": torch.cuda.max_memory_allocated(device),
            "torch_max_reserved_bytes": torch.cuda.max_memory_reserved(device),
            "device_used_bytes": total - free, "device_total_bytes": total, "dali": DALI_MEMORY_NOTE}


# ----------------------------------------------------------------------------------
# Sweeps: threads=4,8,16 hw_decoder_load=0,0.65 batch=128,256 -> a grid of settings
# ----------------------------------------------------------------------------------

# short name -> (config key, or "batch" for the bench's own batch flag; value type)
SWEEP_KEYS: dict[str, tuple[str, type]] = {
    "threads": ("data.num_threads", int),
    "hw_decoder_load": ("data.hw_decoder_load", float),
    "prefetch": ("data.prefetch", int),
    "batch": ("batch", int),
}


def parse_sweep(items: list[str]) -> list[dict]:
    """Every combination of ``key=v1,v2,...`` items, as dicts {short name: value}, in grid order.

    ``key`` is a short name of :data:`SWEEP_KEYS`; each value is parsed to its type.
    """
    axes: list[tuple[str, list]] = []
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not raw.strip():
            raise ConfigError(f"--sweep {item!r}: expected key=v1,v2,... (e.g. threads=4,8,16)")
        if key not in SWEEP_KEYS:
            raise ConfigError(f"--sweep {item!r}: unknown key {key!r} (valid: {', '.join(SWEEP_KEYS)})")
        if key in (k for k, _ in axes):
            raise ConfigError(f"--sweep: {key!r} is given twice; list all its values in one item")
        tp = SWEEP_KEYS[key][1]
        try:
            values = [tp(v) for v in raw.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--sweep {item!r}: every value of {key} must be a {tp.__name__}") from None
        axes.append((key, values))
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*(v for _, v in axes))]


def sweep_overrides(setting: dict) -> tuple[list[str], int | None]:
    """Config overrides (``data.num_threads=8``) and the batch size (or None) of one sweep setting."""
    overrides, batch = [], None
    for key, value in setting.items():
        target = SWEEP_KEYS[key][0]
        if target == "batch":
            batch = int(value)
        else:
            overrides.append(f"{target}={value}")
    return overrides, batch


# ----------------------------------------------------------------------------------
# Environment: what a figure needs next to it to be comparable
# ----------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        return importlib.import_module(module).__version__
    except Exception:  # absent or broken install: report, don't fail the benchmark
        return None


def environment(device: torch.device) -> dict:
    """CPU/GPU, library versions, load and the exact command line of this run."""
    env = {"command": " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv]),
           "python": platform.python_version(), "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
           "usable_cores": usable_cores(), "torch_threads": torch.get_num_threads(), "load_avg_1m": round(os.getloadavg()[0], 2),
           "torch": torch.__version__, "torchvision": _version("torchvision"),
           "dali": _version("nvidia.dali"), "triton": _version("triton"),
           "device": str(device), "gpu_name": None, "gpu_count": 0,
           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if device.type == "cuda":
        env["gpu_name"] = torch.cuda.get_device_name(device)
        env["gpu_count"] = torch.cuda.device_count()
        env["cuda"] = torch.version.cuda
    return env


# ----------------------------------------------------------------------------------
# One pipeline per GPU under torchrun: per-rank figures and the node total
# ----------------------------------------------------------------------------------

def gather_measurement(m: Measurement, info) -> dict:
    """``m`` as a dict; under torchrun also every rank's median and their sum (the node total).

    ``all_gather_object`` is a host-side collective: it runs between timed windows only.
    """
    out = m.to_dict()
    if info.enabled:
        import torch.distributed as dist

        rates = [None] * info.world_size
        dist.all_gather_object(rates, out["images_per_s"]["median"])
        out["per_rank_images_per_s"] = rates
        out["node_images_per_s"] = round(sum(rates), 2)
    return out


# ----------------------------------------------------------------------------------
# Steps: what one timed batch is, for each stage, baseline and feed
# ----------------------------------------------------------------------------------

def loader_step(loader) -> Callable[[], int]:
    """One :class:`~mscn.pipelines.loader.MscnBatch` of ``loader`` per step."""
    from mscn.pipelines.loader import endless  # DALI is imported on first use only

    batches = endless(loader)
    return lambda: next(batches).views[0].shape[0]


def decode_step(cfg, info, device: torch.device) -> tuple[Callable[[], int], object]:
    """Read + decode only (the first stage), built from the same reader and decoder ops
    as the training pipeline; the decoded images stay inside DALI."""
    from nvidia.dali import pipeline_def

    from mscn.pipelines.loader import machine_settings, pipeline_device, rank_seed
    from mscn.pipelines.ops import decode
    from mscn.pipelines.readers import read, resolve_source

    @pipeline_def
    def decode_only(source, kind, hw_decoder_load, shard_id, num_shards, shuffle_buffer, reader_seed):
        encoded, _, _ = read(source, shard_id=shard_id, num_shards=num_shards, shuffle=True,
                             shuffle_buffer=shuffle_buffer, stick_to_shard=False, seed=reader_seed)
        return decode(encoded, kind, hw_decoder_load)

    d, batch = cfg.data, cfg.train.global_batch // info.world_size
    kind, device_id = pipeline_device(device if device.type == "cuda" else None, info.local_rank)
    threads, hw_load = machine_settings(cfg, kind, device_id)
    seed = rank_seed(cfg.train.seed, info.rank)
    pipe = decode_only(resolve_source(d.root, d.format), kind, hw_load, info.rank, info.world_size,
                       d.shuffle_buffer, seed, batch_size=batch, num_threads=threads,
                       device_id=device_id, seed=seed, prefetch_queue_depth=d.prefetch)
    pipe.build()

    def step() -> int:
        (images,) = pipe.run()  # the reader loops over epochs by itself
        return len(images)

    return step, pipe


def torchvision_step(cfg, batch: int, workers: int, info, device: torch.device) -> tuple[Callable[[], int], object]:
    """The PIL/torchvision DataLoader doing the same views and high-pass (pipelines/reference.py),
    its batches moved to ``device`` and masked there, as a user's loop would.

    An endless sampler instead of epochs: with few batches per epoch every epoch
    boundary would idle the workers, a cost the DALI reader (which loops) doesn't pay.
    """
    from torch.utils.data import DataLoader, RandomSampler

    from mscn.config import highpass_params
    from mscn.pipelines.loader import mask_fn_from_cfgs, rank_seed
    from mscn.pipelines.reference import ReferenceViews
    from mscn.pipelines.readers import resolve_source

    d = cfg.data
    hp = highpass_params(cfg.highpass)
    dataset = ReferenceViews(resolve_source(d.root, d.format), cfg.views, d.image_size, d.mean, d.std, hp)
    seed = rank_seed(cfg.train.seed, info.rank)
    sampler = RandomSampler(dataset, num_samples=1 << 40, generator=torch.Generator().manual_seed(seed))
    loader = DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    mask_fn = mask_fn_from_cfgs([v.mask for v in cfg.views], seed)
    batches = iter(loader)

    def step() -> int:
        *views, _, _ = next(batches)
        views = mask_fn([v.to(device, non_blocking=True) for v in views])
        return views[0].shape[0]

    return step, (loader, batches)


def profile_steps(step: Callable[[], int], path: Path, steps: int, sync: Callable[[], None],
                  device: torch.device) -> None:
    """A torch.profiler trace of ``steps`` more steps, written as Chrome trace JSON to ``path``.

    DALI's own threads do not appear as ops; their time shows as the gap in which
    ``next()`` waits on the pipeline.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with profile(activities=activities) as prof:
        for i in range(steps):  # a few steps: a trace of a training step is already tens of MB
            with record_function(f"bench_step_{i}"):
                step()
        sync()
    prof.export_chrome_trace(str(path))
    print(f"profile: {path}", flush=True)
