"""What a figure needs next to it to be comparable (machine, versions, command), sweep
grids, and the per-rank figures of a torchrun benchmark."""
from __future__ import annotations

import importlib
import itertools
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable

import torch

from mscn.errors import ConfigError
from mscn.pipelines.tuning import usable_cores

from benchkit.timing import Measurement

# ----------------------------------------------------------------------------------
# Sweeps: threads=4,8,16 hw_decoder_load=0,0.65 batch=128,256 -> a grid of settings
# ----------------------------------------------------------------------------------

def flag(text: str) -> bool:
    """A sweep's true/false value (``bool("false")`` would be True)."""
    value = {"true": True, "false": False}.get(text.strip().lower())
    if value is None:
        raise ValueError(text)
    return value


# short name -> (config key, or "batch" for the bench's own batch flag; value parser)
SWEEP_KEYS: dict[str, tuple[str, Callable[[str], object]]] = {
    "threads": ("data.num_threads", int),
    "hw_decoder_load": ("data.hw_decoder_load", float),
    "prefetch": ("data.prefetch", int),
    "output_dtype": ("data.output_dtype", str),
    "concurrency": ("data.op_concurrency", str),  # DALI's executor: none | backend | full
    "stream_policy": ("data.stream_policy", str),  # single | per_backend | per_operator
    "affinity": ("data.thread_affinity", flag),  # DALI's threads pinned to cores: false | true
    "blur_window": ("views.*.blur_window", int),  # every view's; 0 = derived from each sample's sigma
    "batch": ("batch", int),
}


SWEEP_MIN = {"threads": 1, "hw_decoder_load": 0.0, "prefetch": 1, "blur_window": 0, "batch": 1}


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
            what = "true or false" if tp is flag else f"a {tp.__name__}"
            raise ConfigError(f"--sweep {item!r}: every value of {key} must be {what}") from None
        if not values:
            raise ConfigError(f"--sweep {item!r}: no values (e.g. {key}=1,2)")
        low = SWEEP_MIN.get(key)
        bad = [v for v in values if low is not None and v < low or key == "hw_decoder_load" and v > 1]
        if bad:  # a row labelled with a value that never ran (batch=0 ran the default batch)
            rule = "in [0, 1]" if key == "hw_decoder_load" else f">= {low}"
            raise ConfigError(f"--sweep {item!r}: {key} must be {rule}, got {bad[0]}")
        axes.append((key, values))
    return [dict(zip([k for k, _ in axes], combo)) for combo in itertools.product(*(v for _, v in axes))]


def sweep_overrides(setting: dict, num_views: int = 4) -> tuple[list[str], int | None]:
    """Config overrides (``data.num_threads=8``) and the batch size (or None) of one sweep
    setting; a ``views.*`` key becomes one override per view of the recipe."""
    overrides, batch = [], None
    for key, value in setting.items():
        target = SWEEP_KEYS[key][0]
        if target == "batch":
            batch = int(value)
        elif target.startswith("views.*."):
            overrides += [f"views.{i}.{target[8:]}={value}" for i in range(num_views)]
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


def command_line() -> str:
    """This process's command line, as a shell would take it back."""
    return " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable), *sys.argv])


def environment(device: torch.device) -> dict:
    """CPU/GPU, library versions, load and the exact command line of this run."""
    env = {"command": command_line(),
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

def gather_measurement(m: Measurement) -> dict:
    """``m`` as a dict; under torchrun also every rank's median and their sum (the node total).

    ``all_gather_object`` is a host-side collective: it runs between timed windows only.
    """
    import torch.distributed as dist

    out = m.to_dict()
    if dist.is_available() and dist.is_initialized():
        rates = [None] * dist.get_world_size()
        dist.all_gather_object(rates, out["images_per_s"]["median"])
        out["per_rank_images_per_s"] = rates
        out["node_images_per_s"] = round(sum(rates), 2)
    return out


