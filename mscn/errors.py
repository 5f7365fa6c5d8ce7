"""One exception type for every user-facing failure, and the one handler that prints it.

Every entry point (``mscn ...``, ``python -m mscn.train.pretrain``, the scripts) runs
its body under :func:`run_cli`, which prints an :class:`MscnError` as a single line
``prog: error: ...`` with exit status 2, instead of a traceback wall (bad path,
corrupt file, config typo...). ``MSCN_DEBUG=1`` lets the traceback through for bug
reports.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import faulthandler
import functools
import hashlib
import io
import json
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

# Errors of the machine, not of the code: a path that cannot be written (permissions, a
# read-only or full disk, a file where a folder should be). With the path named, they get
# one line like an MscnError (MSCN_DEBUG shows the traceback). A missing file is not among
# them: the user's paths are checked where they are read, so an ENOENT here is a bug.
ENVIRONMENT_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EEXIST,
                                errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG})


class MscnError(Exception):
    """A problem the user can fix: the message names the file/key and the fix."""


class ConfigError(MscnError):
    """An invalid configuration value, unknown key or wrong type."""


class CommandLineError(ConfigError):
    """A ConfigError of a ``key=value`` override. torchrun gives every rank the same command
    line, so every rank finds the same error: rank 0 prints it (run_cli), not all eight (or
    32) of them. An error in a YAML file is printed once per node (:func:`say_error`): a node
    may hold another copy."""

    rank0_says = True


class SignalStop(MscnError):
    """A command stopped on a signal; ``status`` is 128 + the signal's number (143 for
    SIGTERM), what a shell reports for it. run_cli prints ``{prog}: {message}``."""

    def __init__(self, msg: str, signum: int):
        super().__init__(msg)
        self.status = 128 + signum


@contextlib.contextmanager
def sigterm_raises(make: Callable[[int], BaseException]) -> Iterator[None]:
    """Within the block, SIGTERM (kill, ``timeout``, a scheduler) raises ``make(signum)`` in the
    main thread, where Python runs signal handlers (elsewhere the block runs as it is); the
    previous handler comes back after it (the default when it was set outside Python)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        stop = make(signum)
        stop.from_signal = True  # raised at whatever line ran: run_cli ends the process without its teardown
        raise stop

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class DataError(MscnError):
    """A missing, empty or unreadable dataset, or a bad image inside it."""


class RunDataError(DataError):
    """A file one rank's loader could not read mid-run, under torchrun: every rank stops
    with the same message (train.pretrain gathers it from that rank), so rank 0 says it."""

    rank0_says = True


def run_cli(main: Callable[[], int | None], prog: str) -> int:
    """Run ``main()`` and return the process exit status.

    0 (or ``main``'s own status) on success; 2 after printing an MscnError as one line
    ``{prog}: error: {message}`` on stderr; an MscnError with a ``status`` attribute (a run
    stopped by a signal, after its checkpoint) prints ``{prog}: {message}`` and returns
    that status (an error marked ``rank0_says``, the same on every rank, is printed by rank 0
    only: a trainer's stop, a :class:`CommandLineError`; under torchrun, the ranks of a node
    print a message they share once, and each failing rank's line goes into torchrun's summary,
    :func:`say_error`); an OSError of the machine (:data:`ENVIRONMENT_ERRNOS`: a path that cannot
    be written, a full disk) is one line naming the path, status 2; a collective that lost the
    other ranks of a multi-rank run (:func:`lost_peers`) is one line saying another rank
    stopped first, status 1; 130 after Ctrl-C. Under ``MSCN_DEBUG`` the
    MscnError propagates with its traceback. Other exceptions are bugs and always keep
    their traceback. Use it as ``sys.exit(run_cli(lambda: body(argv), "mscn"))``.
    """
    _enable_fault_report()
    try:
        with one_line_warnings(prog):
            status = main()
    except MscnError as e:
        status = getattr(e, "status", None)  # e.g. a run stopped on a signal after its checkpoint
        if status is not None and getattr(e, "from_signal", False):
            # raised by a signal handler inside whatever ran (a DALI iterator mid-batch): the
            # interpreter's teardown then hung in a DALI destructor (seen under load, 1 stop in
            # 3), so it is skipped; a stop on a signal has nothing left to save
            _exit_at_teardown(status)
        if os.environ.get("MSCN_DEBUG") and status is None:
            raise
        if getattr(e, "rank0_says", False) and os.environ.get("RANK", "0") != "0":
            # the same on every rank (a trainer's stop, a command-line typo): rank 0 says it
            return 2 if status is None else status
        if status is None:
            say_error(f"{prog}: error: {e}")
            return 2
        print(f"{prog}: {e}", file=sys.stderr, flush=True)
        return status
    except OSError as e:
        # a full disk is the machine's whatever the call: a buffered write's flush names no file
        unnamed_ok = e.errno in (errno.ENOSPC, errno.EDQUOT)
        if e.errno not in ENVIRONMENT_ERRNOS or (e.filename is None and not unnamed_ok) or os.environ.get("MSCN_DEBUG"):
            raise
        say_error(f"{prog}: error: {os_error_line(e)}")
        return 2
    except RuntimeError as e:
        if not lost_peers(e) or os.environ.get("MSCN_DEBUG"):
            raise
        first = str(e).splitlines()[0].split("] ", 1)[-1]  # gloo's line starts with its source file
        first = first.split(". ", 1)[0].rstrip(".")  # its first sentence: "Connection reset by peer [host]:port"
        say_error(f"{prog}: error: rank {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')} lost "
                  f"the other ranks ({first}): another rank stopped first (an error, a kill, a lost node); its own "
                  "message, or torchrun's summary, says which and why", symptom=True)
        _exit_at_teardown(1)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr, flush=True)
        return 130
    finally:
        _quiet_teardown()
    return int(status or 0)


def _enable_fault_report() -> None:
    """Python's fault report on stderr: a process killed by SIGSEGV or SIGBUS said nothing
    (status 135, no line): a data file cut short or rewritten under a live run (DALI reads
    files through memory maps), or DALI 2.4 meeting two damaged files in one batch. The stacks
    name the loader. A ``sys.stderr`` without a file descriptor (redirected to a StringIO, a
    notebook) falls back to the process's own stderr, else goes without."""
    if faulthandler.is_enabled():
        return
    for stream in (sys.stderr, sys.__stderr__):
        if stream is None:
            continue
        try:
            faulthandler.enable(file=stream, all_threads=True)
            return
        except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
            continue


def say_once(line: str, file=None) -> None:
    """Print ``line`` (on stdout, or ``file``) once per node under torchrun, where every rank
    may have it to say (:func:`_first_to_say`), else once."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file and not _first_to_say(Path(error_file).parent.parent, line):
        return
    print(line, file=file or sys.stdout, flush=True)


def say_error(line: str, symptom: bool = False) -> None:
    """Print a failing process's one line on stderr. Under torchrun it also goes into the
    rank's error file, so that torchrun's closing summary names it (otherwise its "Root
    Cause" reads "To enable traceback see: <a link>"), and the ranks of one node print a line
    they share only once: eight ranks that find the same missing ``data.root`` gave eight
    copies. A line of its own (a rank's corrupt JPEG) is always printed. Nodes print theirs:
    they may see other files. Best effort: a failure to record or compare prints the line."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:
        with contextlib.suppress(OSError):
            # the plain form of torchrun's error file: {"message": str, "timestamp": int}. torchrun's
            # "Root Cause" is the failure with the earliest timestamp (seconds; a tie goes to the
            # lowest rank), and a rank that died of a signal gets the time torchrun noticed it: a
            # symptom (a rank that lost the others) is dated a minute late, or rank 0's "lost the
            # other ranks" was named the root cause of rank 1's bus error (a probe)
            stamp = int(time.time()) + (SYMPTOM_DELAY_S if symptom else 0)
            with open(error_file, "w") as f:
                json.dump({"message": line, "timestamp": stamp}, f)
    say_once(line, file=sys.stderr)


SYMPTOM_DELAY_S = 60


def _first_to_say(attempt_dir: Path, line: str) -> bool:
    """Whether no rank of this node said ``line`` in this torchrun attempt: the first to
    create its marker in the attempt's folder (torchrun's, one per node, run and restart)
    says it. O_EXCL makes the claim atomic between the node's ranks."""
    marker = attempt_dir / f"mscn-said-{hashlib.sha1(line.encode()).hexdigest()[:16]}"
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        return False
    except OSError:
        pass  # cannot tell: say it
    return True


# what a collective raises on the ranks that are left when another rank is gone (gloo's TCP
# pair, NCCL's abort); a symptom of that other rank's failure, not a failure of its own
PEER_LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
             "connection was closed by the remote")


def lost_peers(e: BaseException) -> bool:
    """Whether ``e`` is a collective that lost its peers, in a multi-rank run: torch.distributed's
    own error types, or gloo's transport (a file system's "Broken pipe" is no lost rank)."""
    try:
        multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        multi = False
    text = str(e)
    from_dist = type(e).__name__ in ("DistBackendError", "DistNetworkError") or "gloo/transport" in text
    return multi and from_dist and any(p.lower() in text.lower() for p in PEER_LOST)


def _exit_at_teardown(status: int) -> None:
    """End the process with ``status`` at the start of the interpreter's teardown: after a
    rank lost its peers, the process group's C++ threads can abort in their destructors
    ("terminate called without an active exception", status -6 after the one-line message,
    seen under load), so the teardown is skipped; there is nothing left to save."""

    def leave() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    atexit.register(leave)


@functools.cache  # registered once per process
def _quiet_teardown() -> None:
    """Once the command is over, a Ctrl-C during the interpreter's teardown (DALI unloads its
    library in an atexit hook, which takes a moment) would print "Exception ignored in atexit
    callback ... KeyboardInterrupt" after the command's own last line. Registered after the
    command ran, so after DALI's hook, this runs first (atexit is last-in, first-out) and
    ignores SIGINT from there on; SIGTERM and SIGKILL still end the process."""

    def ignore_sigint() -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    atexit.register(ignore_sigint)


_PACKAGES = ("mscn", "mscn.pipelines", "mscn.cuda_kernels", "mscn.train")


def _from_mscn(category: type, filename: str) -> bool:
    """A warning of mscn's: its category is defined in mscn, or it is a plain UserWarning
    raised from mscn's code (the packages' folders: one in an installed wheel, four in a
    checkout). Another library's own category keeps Python's form, which names it."""
    if category.__module__.startswith("mscn"):
        return True
    if category is not UserWarning:
        return False
    path = os.path.abspath(filename)
    folders = [os.path.dirname(os.path.abspath(m.__file__)) for name in _PACKAGES
               if (m := sys.modules.get(name)) is not None and getattr(m, "__file__", None)]
    return any(path.startswith(f + os.sep) for f in folders)


@contextlib.contextmanager
def one_line_warnings(prog: str) -> Iterator[None]:
    """mscn's own warnings printed as one line ``{prog}: warning: ...``: Python prints a
    warning with its file, line number and source line, which tell a user nothing.

    Only the *format* changes (``warnings.formatwarning``, which Python calls just to print):
    filters, ``-W`` options and recorders (``catch_warnings(record=True)``, ``pytest.warns``)
    see every warning as before. ``MSCN_DEBUG`` keeps Python's form."""
    formatted = warnings.formatwarning

    def form(message, category, filename, lineno, line=None):
        if not _from_mscn(category, filename) or os.environ.get("MSCN_DEBUG"):
            return formatted(message, category, filename, lineno, line)
        return f"{prog}: warning: {message}\n"

    warnings.formatwarning = form
    try:
        yield
    finally:
        warnings.formatwarning = formatted


def os_error_line(e: OSError) -> str:
    """``cannot use PATH: Read-only file system`` (both paths of a rename or link)."""
    where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None) or "the disk"
    what = e.strerror or str(e)
    hint = {errno.ENOSPC: "; free some space (or point the output elsewhere) and run again: what was written "
                          "before is kept", errno.EDQUOT: "; the disk quota is exhausted"}.get(e.errno, "")
    return f"cannot use {where}: {what}{hint} (MSCN_DEBUG=1 shows the traceback)"
