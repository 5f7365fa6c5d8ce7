"""The mask and colour kernels compile for a Hopper GPU (sm_90), checked on a machine without one.

The rest of the suite runs the kernels under TRITON_INTERPRET=1, which checks their
results but not that they compile (mscn/cuda_kernels/aot.py says why). These tests run
in subprocesses without that variable, where the kernels are JIT functions.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")


def _no_interpreter_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _run(args: list[str], cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_no_interpreter_env(),
                          cwd=cwd, timeout=600)


def test_mask_kernels_compile_for_sm90_without_spills(tmp_path):
    out = tmp_path / "aot.json"
    r = _run(["-m", "mscn.cuda_kernels.aot", "--quick", "--arch", "90", "--json", str(out)])
    assert r.returncode == 0, r.stdout + r.stderr
    kernels = json.loads(out.read_text())["kernels"]
    assert {k["kernel"] for k in kernels} == {"tables", "fill", "colour"}
    # tables for the 4 views and at grids 8 and 16 (841 and 225 cells), fill x fp16/fp32 x
    # noise on/off, the colour kernel x fp16/fp32
    assert len(kernels) == 9
    for k in kernels:
        assert k["arch"] == 90 and 0 < k["registers"] <= 255, k
        # a spill in these memory-bound kernels is a regression (the table kernel spilled
        # 40 B per thread at 4096 elements per program before it was resized)
        assert k["spill_bytes"] == 0, k


def test_compile_catches_what_the_interpreter_forgives(tmp_path):
    """A kernel whose variable changes type across a branch: the interpreter runs it,
    the compiler refuses it. The AOT check must report that, naming the kernel."""
    (tmp_path / "gap.py").write_text(textwrap.dedent('''
        import triton
        import triton.language as tl

        @triton.jit
        def gap_kernel(x_ptr, n):
            if n > 0:
                v = 1.0
            else:
                v = 1
            tl.store(x_ptr, v)
    '''))
    interp = subprocess.run(
        [sys.executable, "-c", "import sys; sys.path.insert(0, '.')\n"  # gap.py is here, PYTHONSAFEPATH or not
         "import torch, gap; x = torch.zeros(1); gap.gap_kernel[(1,)](x, 3); print(float(x))"],
        capture_output=True, text=True, cwd=tmp_path, env={**_no_interpreter_env(), "TRITON_INTERPRET": "1"},
        timeout=300)
    assert interp.returncode == 0 and interp.stdout.strip() == "1.0", interp.stderr
    r = _run(["-c", textwrap.dedent('''
        import sys; sys.path.insert(0, ".")
        import torch, gap
        from mscn.cuda_kernels.aot import compile_launch
        from mscn.cuda_kernels.mask_triton import Launch
        try:
            compile_launch(Launch(gap.gap_kernel, (1,), (torch.zeros(1), 3), {}), 90)
        except Exception as e:
            print("refused:", type(e).__name__, e)
        else:
            print("compiled")
    ''')], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("refused:") and "Mismatched type" in r.stdout, r.stdout


def test_aot_compiles_for_the_arch_asked_and_keeps_a_real_gpus_cache():
    """Triton caches kernels per device number; the stand-in is device 0. A kernel already
    compiled for a real GPU 0 must neither be handed back for another arch nor lost."""
    r = _run(["-c", textwrap.dedent('''
        import torch
        from mscn.config import MaskCfg
        from mscn.cuda_kernels.aot import compile_launch
        from mscn.cuda_kernels.mask_tables_triton import table_launch
        launch, _ = table_launch(8, 3, 64, 64, [MaskCfg(grid=16)], torch.zeros(1, dtype=torch.int64))
        real = object()  # what a real GPU 0 would have cached
        launch.kernel.device_caches[0] = real
        archs = [compile_launch(launch, a).metadata.target.arch for a in (90, 80)]
        print(archs, launch.kernel.device_caches[0] is real, len(launch.kernel.device_caches))
    ''')])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["[90,", "80]", "True", "1"], r.stdout


def test_aot_refuses_interpreted_kernels():
    r = subprocess.run([sys.executable, "-m", "mscn.cuda_kernels.aot", "--quick"], capture_output=True, text=True,
                       env={**_no_interpreter_env(), "TRITON_INTERPRET": "1"}, timeout=300)
    assert r.returncode == 1
    assert "without TRITON_INTERPRET=1" in r.stderr and "Traceback" not in r.stderr


def test_aot_bad_arch_is_one_clear_error():
    r = _run(["-m", "mscn.cuda_kernels.aot", "--arch", "hopper"])
    assert r.returncode == 2 and "--arch hopper" in r.stderr and "Traceback" not in r.stderr


def test_table_kernel_rounds_the_focal_side_as_the_sampler_does():
    """The focal rectangle's sides are ``floor(sqrt(k * aspect) + 0.5)`` and
    ``floor(k / fh + 0.5)``. Compiled, Triton's ``/`` and ``tl.sqrt`` are approximate
    (div.full.f32, sqrt.approx.f32), so an exact tie such as k=125, fh=10 (grid 8 at 224 px)
    could round down where the torch sampler rounds up. The interpreter divides exactly
    either way, so only the compiled code can show which instructions the kernel uses."""
    r = _run(["-c", textwrap.dedent('''
        import torch
        from mscn.config import MaskCfg
        from mscn.cuda_kernels.aot import compile_launch
        from mscn.cuda_kernels.mask_tables_triton import table_launch
        launch, _ = table_launch(256, 3, 224, 224, [MaskCfg(grid=8, ratio=0.15)], torch.zeros(1, dtype=torch.int64))
        ptx = compile_launch(launch, 90).asm["ptx"]
        print(*(op for op in ("div.full.f32", "div.approx.f32", "sqrt.approx.f32", "div.rn.f32", "sqrt.rn.f32")
                if op in ptx))
    ''')])
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["div.rn.f32", "sqrt.rn.f32"], r.stdout
