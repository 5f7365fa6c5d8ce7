"""Compile the mask kernels (paper §5.2) and the loader's colour kernel (App. A.1) for a GPU
target on a machine without a GPU.

CI runs the kernels under ``TRITON_INTERPRET=1``, which checks what they compute but not
that they *compile*: the interpreter runs the Python body with numpy, and forgives
things the compiler refuses (a type that does not unify across an ``if``, an op with no
lowering). A kernel change could therefore pass CI and break the first time a GPU sees
it. This module builds the launches the host functions would make, with the same
builders (``fill_launch``, ``table_launch``, ``colour_launch``) and so the same argument
types and Triton specializations, and compiles each one down to a cubin for the chosen
architecture (sm_90 = H100/H200) with Triton's own LLVM and bundled ``ptxas``. It needs
no GPU and no CUDA driver: a stand-in driver only names the target.

``ptxas -v`` then reports what the compiled kernel costs the SM: registers per thread,
bytes spilled to local memory, shared memory. That is no timing, but a spill in a
memory-bound fill is a regression that can be seen without a GPU.

Usage: ``python -m mscn.cuda_kernels.aot [--arch 90] [--quick] [--json F]`` in a process
*without* ``TRITON_INTERPRET`` (the kernels must be built as JIT functions).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from mscn.colour import DRAWS, ColourLaw
from mscn.config import load_config
from mscn.cuda_kernels.colour_triton import colour_launch
from mscn.cuda_kernels.mask_tables_triton import group_key, table_launch, table_shape
from mscn.cuda_kernels.mask_triton import INTERPRETED, Launch, fill_launch
from mscn.errors import MscnError

RECIPES = ("demo", "simclr_r50_in1k")  # 64 px / grid 16 and 224 px / grid 32: both table sizes in use
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BATCH = 256  # per-rank batch of the in1k recipes; only the grid and divisibility hints depend on it


@dataclass
class KernelReport:
    kernel: str
    variant: str
    arch: int
    registers: int
    spill_bytes: int  # spill stores + spill loads, as ptxas -v counts them
    stack_bytes: int
    shared_bytes: int
    compile_s: float


class _TargetOnly:
    """A Triton driver that names a target and nothing else: enough to compile, not to launch."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@contextlib.contextmanager
def _target(arch: int, kernels):
    """Compile for ``arch`` inside. Triton caches compiled kernels per device *number*, and
    the stand-in calls itself device 0: the kernels' caches are set aside on entry (so a
    kernel already run on a real GPU 0 is not handed back for another arch) and put back on
    exit (so that GPU keeps its compiled kernels), with the stand-in's entries dropped."""
    prev = getattr(driver, "_active", None)
    saved = [(k, dict(k.device_caches)) for k in kernels]
    for k, _ in saved:
        k.device_caches.clear()
    driver.set_active(_TargetOnly(arch))
    try:
        yield
    finally:
        driver._active = prev
        for k, caches in saved:
            k.device_caches.clear()
            k.device_caches.update(caches)


def compile_launch(launch: Launch, arch: int):
    """The compiled kernel (``triton.compiler.CompiledKernel``) that ``launch`` would run on
    an sm_``arch`` GPU: Triton's runtime specialization, compiled without launching."""
    with _target(arch, [launch.kernel]):
        return launch.kernel.warmup(*launch.args, grid=launch.grid, **launch.kwargs)


def ptxas_info(ptx: str, arch: int) -> dict:
    """Registers, spill and stack bytes of the kernel in ``ptx``, from Triton's bundled ``ptxas -v``."""
    tool = triton.knobs.nvidia.ptxas.path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([tool, f"-arch=sm_{arch}{suffix}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        raise MscnError(f"ptxas failed on sm_{arch}: {r.stderr.strip()[-500:]}")
    text = r.stderr

    def num(pattern: str) -> int:
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0
    return dict(registers=num(r"Used (\d+) registers"), stack_bytes=num(r"(\d+) bytes stack frame"),
                spill_bytes=num(r"(\d+) bytes spill stores") + num(r"(\d+) bytes spill loads"))


def launches(recipes=RECIPES, dtypes=tuple(DTYPES), layouts=("nchw", "nhwc"), inplace=(True, False),
             sweep_grids=(4, 8, 16, 32)):
    """``(kernel, variant, Launch)`` for what the recipes' views launch: the table kernel
    for each group of views (and, at each recipe's size, for every grid of ``sweep_grids``),
    and the fill kernel for each dtype, memory layout and in/out of place, with
    and without noise. CPU tensors stand in for the views."""
    out = []
    for name in recipes:
        cfg = load_config(name)
        size = cfg.data.image_size
        masks = [v.mask for v in cfg.views if v.mask.ratio > 0]
        groups: dict[tuple, list] = {}
        for m in masks:
            groups.setdefault(group_key(size, size, m), []).append(m)
        for key, cfgs in groups.items():
            keys = torch.zeros(len(cfgs), dtype=torch.int64)
            launch, _ = table_launch(BATCH, 3, size, size, cfgs, keys)
            out.append(("tables", f"{name} {size}px grid {key[2]} x{len(cfgs)} views", launch))
        for grid in sweep_grids:  # the table kernel at other grid sizes (cells per plane)
            if grid != masks[0].grid:
                g = dataclasses.replace(masks[0], grid=grid)
                launch, _ = table_launch(BATCH, 3, size, size, [g], torch.zeros(1, dtype=torch.int64))
                n = table_shape(size, size, g)
                out.append(("tables", f"{name} {size}px grid {grid} ({n[0] * n[1]} cells)", launch))
        m = masks[0]
        table = table_launch(BATCH, 3, size, size, [m], torch.zeros(1, dtype=torch.int64))[1][0]
        for dt in dtypes:
            for layout in layouts:
                fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
                x = torch.empty(BATCH, 3, size, size, dtype=DTYPES[dt]).to(memory_format=fmt)
                for ip in inplace:
                    y = x if ip else torch.empty_like(x)
                    for noise in (True, False):
                        tag = f"{name} {size}px {dt} {layout} {'in place' if ip else 'out of place'}" \
                              f"{'' if noise else ' no noise'}"
                        t = table if noise else _no_noise(table)
                        out.append(("fill", tag, fill_launch(x, y, t)))
        # the colour kernel (data.colour_where=loader): uint8 views in, each output dtype
        u8 = torch.empty(BATCH, size, size, 3, dtype=torch.uint8)  # DALI's HWC crops
        draws, sigma = torch.empty(BATCH, len(DRAWS), dtype=torch.float32), torch.empty(BATCH, dtype=torch.float32)
        law = ColourLaw.of(cfg.views[0], blur=True)
        for dt in dtypes:
            y = torch.empty(BATCH, 3, size, size, dtype=DTYPES[dt])
            out.append(("colour", f"{name} {size}px {dt}",
                        colour_launch(u8, draws, law, y, sigma, cfg.data.mean, cfg.data.std)))
    return out


def _no_noise(spec):
    """A MaskTable without noise (the fill kernel's NOISE=False variant)."""
    return dataclasses.replace(spec, noise_std=0.0)


KERNELS = ("tables", "fill", "colour")


def compile_all(arch: int = 90, quick: bool = False, kernels=KERNELS, say=print) -> list[KernelReport]:
    """Compile every launch of :func:`launches` (``quick``: the 224 px recipe, fp16 and
    fp32, NCHW, in place, table grids 8 to 32) of ``kernels`` for sm_``arch``; one
    :class:`KernelReport` each."""
    if INTERPRETED:
        raise MscnError("mscn.cuda_kernels.aot needs the kernels as JIT functions: run it in a process "
                        "without TRITON_INTERPRET=1")
    todo = (launches(("simclr_r50_in1k",), ("fp16", "fp32"), ("nchw",), (True,), (8, 16, 32)) if quick
            else launches())
    todo = [t for t in todo if t[0] in kernels]
    reports = []
    for i, (kernel, variant, launch) in enumerate(todo, 1):
        t0 = time.perf_counter()
        try:
            compiled = compile_launch(launch, arch)
        except Exception as e:  # the compiler's own message (a CompilationError names the line)
            raise MscnError(f"{kernel} ({variant}) does not compile for sm_{arch}:\n{e}") from e
        info = ptxas_info(compiled.asm["ptx"], arch)
        rep = KernelReport(kernel=kernel, variant=variant, arch=arch, shared_bytes=int(compiled.metadata.shared),
                           compile_s=round(time.perf_counter() - t0, 2), **info)
        reports.append(rep)
        say(f"[{i}/{len(todo)}] sm_{arch} {kernel:6s} {variant}: {rep.registers} registers, "
            f"{rep.spill_bytes} B spilled, {rep.shared_bytes} B shared ({rep.compile_s:.1f} s)")
    return reports


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mscn.cuda_kernels.aot", description=__doc__.split("\n\n")[0],
                                allow_abbrev=False)
    p.add_argument("--arch", default="90", help="comma list of SM versions, e.g. 80,90 (default 90)")
    p.add_argument("--quick", action="store_true", help="the 224 px recipe, fp16/fp32, NCHW, in place only")
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list of {','.join(KERNELS)} (default: all)")
    p.add_argument("--json", help="write the reports here")
    args = p.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",")]
    except ValueError:
        p.error(f"--arch {args.arch}: a comma list of integers such as 80,90")
    kernels = args.kernels.split(",")
    if set(kernels) - set(KERNELS):
        p.error(f"--kernels {args.kernels}: pick from {','.join(KERNELS)}")
    try:
        reports = [r for a in archs for r in compile_all(a, args.quick, kernels)]
    except MscnError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    spilled = [r for r in reports if r.spill_bytes]
    print(f"{len(reports)} kernels compiled for sm_{','.join(map(str, archs))} (triton {triton.__version__}); "
          f"{len(spilled)} spill to local memory" + "".join(f"\n  {r.kernel} {r.variant}: {r.spill_bytes} B"
                                                           for r in spilled))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "kernels": [asdict(r) for r in reports]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
