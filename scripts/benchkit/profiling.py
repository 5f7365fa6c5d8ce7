"""Where the device's time goes: a torch.profiler trace of a few steps, summed up.

Issue 10's open question is *why* the full pipeline delivers 41 % of decode-only on an
H200 and takes ~14 ms of each ResNet-18 step: too many or too slow GPU kernels (then the
kernel table names them), or a host that cannot issue them fast enough (then the GPU is
idle for most of a step). A Chrome trace answers that in a viewer; this module answers it
in the log, so that one short run on a lent GPU brings the answer back as numbers.

CUPTI records every kernel of the process, whichever library launched it, so DALI's
kernels (launched from DALI's own threads) are in the trace beside torch's and ours.
On the CPU there are no device events: the summary lists the torch ops of the calling
thread instead (DALI's CPU threads do not appear there; their time is the wait in
``next()``).
"""
from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.autograd import DeviceType

# The Triton kernels of mscn.cuda_kernels, by their function names (tests/test_bench.py
# checks that these still exist, so a rename cannot silently move them to "torch").
MSCN_KERNELS = ("_mask_kernel", "_table_kernel")
OWNERS = ("dali", "decode", "mscn", "other", "copy")
DEVICE_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")  # kineto's names for them


def owner(name: str) -> str:
    """Which part of the stack launched a device event, from its (demangled) name."""
    low = name.lower()
    if low.startswith(("memcpy", "memset")):
        return "copy"
    if "nvjpeg" in low or "nvimgcodec" in low:
        return "decode"
    if "dali" in low:
        return "dali"
    if short_name(name) in MSCN_KERNELS:
        return "mscn"
    # torch, cuDNN, cuBLAS, CUTLASS (the trainer, the loader's GEMMs), and any library the
    # names above miss; summarize_device gives those on DALI's own streams to "dali"
    return "other"


def short_name(name: str, width: int = 90) -> str:
    """A kernel's name without its template arguments, parameter list and return type:
    ``void dali::kernels::Foo<float, 3>(Args)`` -> ``dali::kernels::Foo``."""
    out, depth, prev = [], 0, ""
    for ch in name.replace("(anonymous namespace)", "anon"):
        if ch in "<(":
            depth += 1
        elif ch in ">)" and depth and not (ch == ">" and prev == "-"):  # "->" closes nothing
            depth -= 1
        elif depth == 0:
            out.append(ch)
        prev = ch
    text = re.sub(r"\s+", " ", "".join(out)).strip()
    text = re.sub(r"^(void|auto) ", "", text)
    return text[:width] if text else name[:width]


def _busy_ns(intervals: list[tuple[int, int]]) -> int:
    """Length of the union of [start, end) intervals: time with at least one event running."""
    total, cur_start, cur_end = 0, None, None
    for start, end in sorted(intervals):
        if cur_end is None or start > cur_end:
            if cur_end is not None:
                total += cur_end - cur_start
            cur_start, cur_end = start, end
        else:
            cur_end = max(cur_end, end)
    if cur_end is not None:
        total += cur_end - cur_start
    return total


def _dali_streams(events: list[tuple]) -> set:
    """Streams whose named kernels are all DALI's (or the decoder's): a kernel there with a
    generic name is DALI's too. DALI's GaussianBlur runs as CUTLASS convolutions
    (``cutlass::Kernel<...ConvMmaPipelined...>``, no "dali" in the name): by name alone,
    round 3 on an H200 credited 15 of DALI's 24 ms of kernels per ResNet-18 step to
    "other", the trainer's owner. torch, the loader's GEMMs and mscn's kernels run on
    torch's streams; a stream with any torch (``at::``) kernel is never DALI's."""
    named: dict = defaultdict(set)
    for ev in events:
        if len(ev) > 3 and ev[3] is not None:
            who = owner(ev[0])
            if who == "other" and short_name(ev[0]).startswith("at::"):
                who = "torch"
            if who not in ("copy", "other"):
                named[ev[3]].add(who)
    return {sid for sid, who in named.items() if "dali" in who and who <= {"dali", "decode"}}


def summarize_device(events: Iterable[tuple], steps: int, step_ms: float | None = None,
                     top: int = 12) -> dict:
    """Per-step device figures from ``(name, start_ns, duration_ns[, stream])`` events
    (kernels, copies, sets) recorded over ``steps`` steps.

    ``busy_ms``: the union of the events' intervals, i.e. time with the GPU doing something;
    ``kernel_ms``: their sum (larger than busy when streams overlap). ``step_ms`` (the
    unprofiled step time, from the timed windows) turns busy into ``busy_share``: near 1
    means the GPU is the limit, well below 1 that the host is (launching, waiting on
    DALI's CPU stage). ``top``: the events with the most device time, by short name;
    ``streams``: device time per CUDA stream with its owners (DALI runs on its own streams,
    the trainer on torch's), when the events carry their stream.
    """
    events = list(events)
    dali_streams = _dali_streams(events)
    per = defaultdict(lambda: [0, 0])  # (short name, owner) -> [calls, ns]: one name may run on two owners' streams
    owners = dict.fromkeys(OWNERS, 0)
    streams: dict = defaultdict(lambda: defaultdict(int))
    intervals, launches = [], 0
    for ev in events:
        name, start, dur = ev[:3]
        key, who = short_name(name), owner(name)
        if who == "other" and len(ev) > 3 and ev[3] in dali_streams:
            who = "dali"  # a generically named kernel on DALI's own stream (see _dali_streams)
        per[key, who][0] += 1  # who from the full name ("dali" may sit in template arguments only) and stream
        per[key, who][1] += dur
        owners[who] += dur
        if len(ev) > 3 and ev[3] is not None:
            streams[ev[3]][who] += dur
        intervals.append((start, start + dur))
        launches += who != "copy"
    ms = 1e-6 / steps
    busy = _busy_ns(intervals) * ms
    rows = sorted(per.items(), key=lambda kv: -kv[1][1])
    out = {"steps": steps, "busy_ms": round(busy, 3), "kernel_ms": round(sum(v[1] for v in per.values()) * ms, 3),
           "launches": round(launches / steps, 1),
           "by_owner_ms": {k: round(v * ms, 3) for k, v in owners.items()},
           "top": [{"name": k, "owner": who, "calls": round(c / steps, 1), "ms": round(ns * ms, 3)}
                   for (k, who), (c, ns) in rows[:top]]}
    if streams:
        out["streams"] = sorted(({"stream": sid, "ms": round(sum(w.values()) * ms, 3),
                                  "by_owner_ms": {k: round(v * ms, 3) for k, v in w.items() if v}}
                                 for sid, w in streams.items()), key=lambda r: -r["ms"])
    if step_ms:
        out["step_ms"] = round(step_ms, 3)
        out["busy_share"] = round(busy / step_ms, 3)
    return out


def summarize_host(prof, steps: int, step_ms: float | None = None, top: int = 12) -> dict:
    """Per-step host figures (the CPU path): the torch ops of the profiled thread by self
    time, and their share of ``step_ms`` (the profiled step: the profiler slows both)."""
    avgs = [a for a in prof.key_averages() if not a.key.startswith("bench_step_")]
    rows = sorted(avgs, key=lambda a: -a.self_cpu_time_total)
    total_us = sum(a.self_cpu_time_total for a in avgs)
    out = {"steps": steps, "torch_ops_ms": round(total_us / 1e3 / steps, 3),
           "top": [{"name": a.key, "calls": round(a.count / steps, 1),
                    "ms": round(a.self_cpu_time_total / 1e3 / steps, 3)} for a in rows[:top]]}
    if step_ms:
        out["step_ms"] = round(step_ms, 3)
        out["torch_ops_share"] = round(out["torch_ops_ms"] / step_ms, 3)
    return out


def is_device_work(e) -> bool:
    """A kineto event that occupies the device: a kernel, a copy or a set.

    torch >= 2.12 names the kind (``activity_type()``); torch 2.11, on the GPU box, does not,
    so there: any device-side event that is not a ``record_function`` span mirrored onto
    the GPU ("gpu_user_annotation": it covers whole steps and would count as busy time) and
    not a synchronization record."""
    if hasattr(e, "activity_type"):
        return e.activity_type() in DEVICE_ACTIVITIES
    if e.device_type() == DeviceType.CPU or e.is_user_annotation():
        return False
    name = e.name()
    return not (name.endswith(" Sync") or name == "Stream Wait Event" or "overhead" in name.lower())


def device_events(kineto_events) -> tuple[list[tuple], int]:
    """(name, start_ns, duration_ns, stream) of the device work among ``kineto_events`` that
    lies within the profiled steps (from the first ``bench_step_`` span to the last host
    event, the final synchronize), and how many device events fell outside: kernels DALI ran
    before the window, or records with a broken timestamp."""
    events = list(kineto_events)
    host = [e for e in events if e.device_type() == DeviceType.CPU]
    steps = [e.start_ns() for e in host if e.name().startswith("bench_step_")]
    lo = min(steps) if steps else min((e.start_ns() for e in host), default=0)
    hi = max((e.end_ns() for e in host), default=0)
    out, dropped = [], 0
    for e in events:
        if not is_device_work(e):
            continue
        start, dur = e.start_ns(), e.duration_ns()
        if start < lo or start + dur > hi or dur < 0:
            dropped += 1
            continue
        stream = e.device_resource_id() if hasattr(e, "device_resource_id") else None
        out.append((e.name(), start, dur, stream))
    return out, dropped


def profile_steps(step: Callable[[], int], steps: int, sync: Callable[[], None], device: torch.device,
                  trace: Path | None = None, step_ms: float | None = None) -> dict:
    """Run ``steps`` more steps under torch.profiler; return their summary (device events
    on a GPU, torch ops on the CPU) and write the Chrome trace to ``trace`` if given.

    The profiler slows the host (CUPTI hooks every launch, every torch op is recorded), so
    ``wall_ms`` per profiled step is an upper bound; ``step_ms`` from the unprofiled windows
    is the step time to read the device figures against.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if not cuda:
        # torch's CUDA build asks for GPUs anyway and prints "ERROR: ... gpuGetDeviceCount
        # failed with code 35" on a machine without one; on a GPU, Kineto's errors (CUPTI not
        # allowed, say) are kept: they explain an empty device column
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    sync()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(steps):
            with record_function(f"bench_step_{i}"):
                step()
        sync()
        wall = time.perf_counter() - t0
    wall_ms = 1e3 * wall / steps
    # device time is the work's own (the profiler slows the host, not the kernels), so it is
    # read against the unprofiled step; host op time is slowed too, so against the profiled one
    if cuda:
        events, dropped = device_events(prof.profiler.kineto_results.events())
        if not events:  # 0 % busy would read as "host-bound": say that nothing was recorded
            summary = {"error": f"no device events recorded ({dropped} outside the profiled steps): "
                                "CUPTI unavailable, or another profiler attached"}
        else:
            summary = summarize_device(events, steps, step_ms)
            summary["events_outside_window"] = dropped
    else:
        summary = summarize_host(prof, steps, wall_ms)
    summary["wall_ms"] = round(wall_ms, 3)
    if trace is not None:  # the summary is kept if the export fails
        try:
            trace.parent.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(trace))
            summary["trace"] = str(trace)
        except OSError as e:
            summary["trace_error"] = f"{type(e).__name__}: {e}"
    return summary


def format_summary(label: str, s: dict) -> list[str]:
    """The summary as log lines (``PROFILE`` first, which gpu_check.sh's digest keeps)."""
    if "error" in s:
        return [f"PROFILE {label}: failed ({s['error']})"]
    if "busy_ms" in s:
        owners = ", ".join(f"{k} {v:.2f}" for k, v in s["by_owner_ms"].items() if v)
        share = f" = {100 * s['busy_share']:.0f} % of a {s['step_ms']:.1f} ms step" if "busy_share" in s else ""
        head = (f"PROFILE {label}: GPU busy {s['busy_ms']:.2f} ms per step{share}; kernel time by owner (ms): "
                f"{owners or 'none'}; {s['launches']:.0f} launches per step")
    else:
        share = (f" = {100 * s['torch_ops_share']:.0f} % of a {s['step_ms']:.1f} ms profiled step (the rest: "
                 "waiting, e.g. on DALI's threads)" if "torch_ops_share" in s else "")
        head = f"PROFILE {label}: torch ops on the calling thread {s['torch_ops_ms']:.2f} ms per step{share}"
    lines = [head, "  ms/step  calls/step  " + ("owner   " if "busy_ms" in s else "") + "name"]
    if "trace_error" in s:
        lines.insert(1, f"  (the trace was not written: {s['trace_error']})")
    for r in s["top"]:
        lines.append(f"  {r['ms']:7.3f}  {r['calls']:10.1f}  " + (f"{r['owner']:<7} " if "owner" in r else "")
                     + r["name"])
    for st in s.get("streams", []):
        owners = ", ".join(f"{k} {v:.2f}" for k, v in st["by_owner_ms"].items())
        lines.append(f"  stream {st['stream']}: {st['ms']:.2f} ms per step ({owners})")
    return lines
