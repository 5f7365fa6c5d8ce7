"""Preemption: SIGINT / SIGTERM / SIGHUP finish the current step, write a checkpoint, and stop.

SLURM (``--signal=TERM@120``), Kubernetes and torchrun's agent all send SIGTERM before
they kill a job; Ctrl-C sends SIGINT; a dropped ssh session sends SIGHUP to a run started
in it (which ended at once, its steps since the last checkpoint lost). The handler only records the signal. The loop asks
:meth:`StopFlag.agreed` once a step, after it has its batch and before it trains on it;
under torchrun the flag is all-reduced (MAX) so that every rank stops after the same step,
even when the signal reached only some of them. The same all-reduce carries whether a
rank's loader failed on a file for this batch: then no rank enters the step (whose
gradient all-reduce would wait for that rank forever), and all of them checkpoint the
steps trained instead (train.pretrain). It runs on a gloo group over the CPU, so it adds
no GPU sync.

A second Ctrl-C interrupts at once (the first restores Python's default handler).
"""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

from mscn.errors import SignalStop

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Stopped(SignalStop):
    """The run stopped on a signal after writing a checkpoint; ``status`` is 128 + signal
    number (130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP), what a shell reports for that signal."""

    rank0_says = True  # every rank stops at the same step with the same line: run_cli prints rank 0's


def _detach_from_terminal() -> None:
    """Point stdout and stderr that are terminals at /dev/null."""
    devnull = None
    try:
        for fd in (1, 2):
            if os.isatty(fd):
                devnull = devnull if devnull is not None else os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, fd)
    except OSError:
        pass
    finally:
        if devnull is not None:
            os.close(devnull)


class StopFlag:
    """Context manager: installs the handlers on entry, restores the previous ones on exit."""

    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}
        self._group = None

    def __enter__(self) -> StopFlag:
        for sig in SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:  # nohup: the user asked that it not stop the run
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        if dist.is_initialized():
            # a CPU group for the flag: an NCCL all-reduce would be a host sync every step
            self._group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else dist.group.WORLD
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        if signum == signal.SIGINT:  # a second Ctrl-C: KeyboardInterrupt now
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if signum == signal.SIGHUP:
            # the terminal is gone: a write to it raises EIO, and the stop line would end the
            # process with a traceback after its checkpoint. STOPPED holds that line
            _detach_from_terminal()

    def agreed(self, failed: bool = False) -> tuple[int, int | None]:
        """``(signal, rank)``: the signal every rank stops on (0: none), and the lowest rank
        whose loader ``failed`` on this step's batch (None: none). A collective under
        torchrun: call it on every rank once a step."""
        if self._group is None:
            return self.signum, 0 if failed else None
        world = dist.get_world_size(self._group)
        # one MAX for both: world - rank is largest for the lowest failed rank
        flag = torch.tensor([self.signum, world - dist.get_rank(self._group) if failed else 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        signum, first = (int(v) for v in flag)
        return signum, world - first if first else None

    @property
    def group(self):
        """The flag's CPU (gloo) process group; None in one process."""
        return self._group

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
