"""benchkit: the harness behind the benchmark scripts in scripts/ (not part of the
installed package; the scripts find it beside them on ``sys.path``).

- ``timing``: ``measure()``, the one timing loop (warm-up, synchronized windows,
  median and spread, CPU time of the process tree, GPU memory);
- ``env``: machine and versions beside every figure, sweep grids, torchrun totals;
- ``steps``: what one timed step is (a DALI stage, decode alone, a hand-written
  plain DALI pipeline, the torchvision reference);
- ``profiling``: a few steps under torch.profiler, summed up as device time per step
  (busy share, kernels by owner: DALI, decode, mscn's Triton, torch, copies).
"""
