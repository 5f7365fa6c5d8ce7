"""Say so when a rank's training loop stops moving, and where it stands.

A rank that stalls (a hung network file system under the reader, a dead GPU, a deadlock)
stops its peers too: they wait in the step's gradient all-reduce until torch.distributed's
timeout (30 min under gloo, 10 under NCCL), and on a cluster nothing shows for that long.
So every rank runs a :class:`StallWatch`: the loop marks what it is doing (waiting for a
batch, in a step, writing a checkpoint, in the kNN monitor) and the step it is at, and a
daemon thread prints one line when one phase has lasted ``train.stall_warn_s`` seconds. It
then appends the Python stacks of all the rank's threads to ``<out_dir>/stalls/rank<R>.txt``
(``faulthandler``, which works while the main thread is stuck inside C code; written from a
thread of its own, after the line, since the run folder's file system may be what hangs).
When the loop moves again it says how long it stood. A step, a checkpoint and the monitor
end in collectives, so a rank stuck there usually waits for another rank: the one that
waits for its batch, or the one that says nothing at all, is the stalled one.

Not in the paper: an operations aid for its long multi-node runs (§6 and App. A.1: 800 epochs for
SimCLR, 1000 for BYOL, on 32 V100 GPUs for about 180 hours).
"""
from __future__ import annotations

import faulthandler
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

# phase -> (the stall's line, the phase's name in the line that says it ended)
_SAYS = {
    "data": ("no batch from its loader for {s} (step {step})", "the wait for the batch of step {step}"),
    "step": ("step {step} has run for {s}", "step {step}"),
    "checkpoint": ("the checkpoint after step {step} has taken {s}", "the checkpoint after step {step}"),
    "monitor": ("the kNN monitor after step {step} has not moved for {s}", "the kNN monitor after step {step}"),
    "eval": ("the evaluation has not moved for {s}", "the pause in the evaluation"),
}
# phases that end in collectives (a step's gradients, loss check and stop flag; a checkpoint's
# gather of the loader states; the monitor's gather of features): a rank stuck there usually
# waits for another one
# evaluation: DDP fine-tuning steps and the gathers of features and scores
_COLLECTIVE = ("step", "checkpoint", "monitor", "eval")
_WAITS_FOR_PEERS = "; it waits for every rank, so another rank may be the stalled one"


_ACTIVE: list["StallWatch"] = []  # the watch of the loop running now (pretraining's), for beat()


def beat() -> None:
    """Progress inside a long phase (a batch of an evaluation or of the kNN monitor's feature
    pass): the phase goes on, its clock restarts. A no-op outside a watched loop."""
    if _ACTIVE:
        w = _ACTIVE[-1]
        phase, step, _ = w._mark
        w._mark = (phase, step, time.monotonic())


def _seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _write(text: str) -> None:
    tqdm.write(text)  # above the rank's progress bar, not glued to it
    sys.stdout.flush()


def _phase_name(mark: tuple) -> str:
    """A mark's phase as the lines name it: "the wait for the batch of step 5" (``_SAYS``)."""
    phase, step = mark[0], mark[1]
    return _SAYS.get(phase, ("", phase + " of step {step}"))[1].format(step=step)


class StallWatch:
    """A daemon thread that reports a phase of the loop lasting ``after_s`` seconds or more.

    ``at(phase, step)`` marks the start of a phase (one of ``data``, ``step``,
    ``checkpoint``, ``monitor``, ``eval``); it costs an attribute write and a clock read;
    :func:`beat` restarts the clock of a long phase that moves (a batch). ``after_s``
    0 turns the watch off. ``stacks_dir``: where the stack files go (None: none written).
    ``printer``: takes each line (default: stdout, above a progress bar). Use as a context
    manager: the thread stops on exit.
    """

    def __init__(self, rank: int, world_size: int, after_s: float, stacks_dir: str | Path | None,
                 printer=_write, phase: str = "data"):
        self.rank, self.world_size, self.after_s = rank, world_size, float(after_s)
        self.stacks_dir = Path(stacks_dir) if stacks_dir else None
        self._print = printer
        self._mark = (phase, 0, time.monotonic())  # one tuple: the thread reads it whole
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def at(self, phase: str, step: int) -> None:
        self._mark = (phase, step, time.monotonic())

    def __enter__(self) -> "StallWatch":
        if self.after_s > 0:
            self._mark = (self._mark[0], self._mark[1], time.monotonic())
            self._thread = threading.Thread(target=self._watch, name="mscn-stall-watch", daemon=True)
            self._thread.start()
            _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _say(self, text: str) -> None:
        who = f"rank {self.rank} of {self.world_size}: " if self.world_size > 1 else ""
        self._print(f"[mscn] {who}{text}")

    def _watch(self) -> None:
        poll = min(5.0, max(0.01, self.after_s / 4))
        stalled = None  # the mark that was reported, until the loop moves past it
        while not self._stop.wait(poll):
            mark = self._mark
            phase, step, since = mark
            if stalled is not None and mark is not stalled:
                self._say(f"moving again: {_phase_name(stalled)} took {_seconds(mark[2] - stalled[2])}")
                stalled = None
            idle = time.monotonic() - since
            if stalled is None and idle >= self.after_s:
                stalled = mark
                text = _SAYS.get(phase, (phase + " of step {step} has run for {s}",))[0].format(
                    s=_seconds(idle), step=step)
                if phase in _COLLECTIVE and self.world_size > 1:
                    text += _WAITS_FOR_PEERS
                path = self.stacks_dir / f"rank{self.rank}.txt" if self.stacks_dir else None
                # the line first: the stacks go to the run folder, whose file system may be what hangs
                self._say(text + (f"; its threads' stacks: {path}" if path else ""))
                if path is not None:
                    threading.Thread(target=self._dump_stacks, args=(path, mark), name="mscn-stall-stacks",
                                     daemon=True).start()

    def _dump_stacks(self, path: Path, mark: tuple) -> None:
        """Append every thread's Python stack to ``path`` (one section per stall)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(f"\n=== rank {self.rank} of {self.world_size}, {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                        f"{_phase_name(mark)}\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
        except OSError as e:  # a read-only or full folder
            self._say(f"its threads' stacks could not be written to {path} ({e.strerror or e})")
