"""Another process holding a run folder's ``.lock`` as a live run's rank 0 does (a real
``flock``, train/rundir.lock_run_dir), for the tests of what a second launch meets."""
from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

_HOLD = """import fcntl, os, sys, time
f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX)
f.seek(0); f.truncate(); f.write(f'pid {os.getpid()} on test'); f.flush(); print('held', flush=True)
time.sleep(120)
"""


@contextlib.contextmanager
def held_lock(folder: Path):
    """Yields the pid of a process that holds ``folder/.lock`` (``pid N on test`` in it)
    until the block ends, when it is killed (as SIGKILL ends a run)."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(Path(folder) / ".lock")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(timeout=30)
