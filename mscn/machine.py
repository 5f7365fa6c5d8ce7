"""What this machine lets the process use, shared by every stage (the data tools' process
pools, the pipelines' DALI threads, the benchmarks)."""
from __future__ import annotations

import os


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, a SLURM or cgroup slice of a
    bigger node) on Linux, not the node's count, which would start 128 workers on 4 cores."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
