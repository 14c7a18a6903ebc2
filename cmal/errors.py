"""The one error contract of every command: what a user can fix is a UserError, printed as one
line on stderr with exit status 2; anything else is a bug and keeps its traceback."""
import errno
import os
import sys
from pathlib import Path

USER_ERROR_STATUS = 2
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a Ctrl-C


class UserError(Exception):
    """A failure the user can fix: bad data, settings, files or devices. Its message says what is
    wrong in terms of what was given, and what to do."""


class NonFiniteError(UserError, FloatingPointError):
    """A training loss or the weights became NaN or infinite; the model is no longer worth
    saving."""


# What to do about a loss or weights that went non-finite: a resumed run keeps the learning rate
# it was trained with, so a lower one means a new run.
NON_FINITE_FIXES = ("Start a new run with a lower --lr (--overwrite or another --output_dir), or "
                    "check the data (python -m cmal.tools.check_data DATA_PATH).")


class WeightsError(UserError, RuntimeError):
    """A weight file that cannot be used: missing, unreadable, unsafe or of another architecture."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


# A full filesystem, or the user's quota spent on it: what a user fixes by freeing space.
DISK_FULL = {errno.ENOSPC: "no space left", errno.EDQUOT: "the disk quota is exhausted"}


class WriteError(UserError):
    """A file that could not be written (a full disk, a read-only folder). `problem`: what the
    system said; `path`: the file (None where the system did not say); `outcome`: what became
    of it; `advice`: what to do."""

    def __init__(self, problem, path, outcome, advice):
        super().__init__(f"{problem} while writing {path or 'a file the system did not name'}; "
                         f"{outcome}; {advice}")
        self.problem, self.path, self.outcome, self.advice = problem, path, outcome, advice

    def amended(self, outcome=None, advice=None):
        """The same failure told by the command that met it, which knows best what it kept and
        how to continue."""
        return type(self)(self.problem, self.path, outcome or self.outcome,
                          advice or self.advice)


class DiskFullError(WriteError):
    """A write stopped by a full filesystem (ENOSPC) or an exhausted quota (EDQUOT)."""


def disk_full_cause(exc):
    """The OSError saying the disk is full or the quota spent, among `exc` and the exceptions
    it arose from; None if there is none."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def device_full(folder, margin=1 << 20):
    """An ENOSPC OSError if the filesystem of `folder` has less than `margin` bytes free, else
    None: what torch's own file writers leave to tell a full disk by (their RuntimeError holds
    no errno)."""
    import shutil
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) if free < margin else None


def write_error(path, cause, outcome, advice=None):
    """The WriteError of an OSError `cause` met writing `path` (None: not known): DiskFullError
    naming the filesystem where the disk is full, else the system's reason."""
    folder = Path(path).parent if path else None
    if cause.errno in DISK_FULL:
        where = (f"the device holding {folder} (the filesystem mounted at "
                 f"{mount_point(folder)})" if folder else "a device")
        return DiskFullError(f"{DISK_FULL[cause.errno]} on {where}", path, outcome,
                             advice or "free space and run the command again")
    return WriteError(f"cannot write ({cause.strerror or cause})", path, outcome,
                      advice or f"make {folder or 'the folder'} writable or write elsewhere, and "
                                "run the command again")


def mount_point(path):
    """The mount point of the filesystem holding `path` (or its nearest existing parent)."""
    path = os.path.realpath(path)
    while not os.path.exists(path) and path != os.path.dirname(path):
        path = os.path.dirname(path)
    device = os.stat(path).st_dev
    while path != os.path.dirname(path) and os.stat(os.path.dirname(path)).st_dev == device:
        path = os.path.dirname(path)
    return path


def one_line(exc):
    """The message of `exc` on one line. Errors raised in DataLoader workers arrive with the
    worker's traceback in their text; its last line is "module.ErrorName: message"."""
    text = str(exc).strip()
    if "Traceback" in text:
        last = text.splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(text.split()) or type(exc).__name__


def run_command(body, *args, on_interrupt=None):
    """Run a command's `body(*args)` and return its exit status: a UserError becomes one line on
    stderr and USER_ERROR_STATUS; Ctrl-C becomes `on_interrupt()`'s line (if any) and
    INTERRUPTED_STATUS; output piped into a program that stopped reading ends quietly. A full
    disk met where no writer named the file is still a user error, said in one line."""
    try:
        return body(*args)
    except UserError as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return USER_ERROR_STATUS
    except KeyboardInterrupt:
        if on_interrupt is not None:
            print(f"\n{on_interrupt()}", file=sys.stderr)
        return INTERRUPTED_STATUS
    except BrokenPipeError:  # `| head`: stop quietly, and keep Python's exit from complaining
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (OSError, RuntimeError) as exc:  # torch reports a failed write as a RuntimeError
        cause = disk_full_cause(exc)
        if cause is None:
            raise
        print(f"error: {one_line(unnamed_disk_full(cause))}", file=sys.stderr)
        return USER_ERROR_STATUS


def unnamed_disk_full(cause, advice=None):
    """The DiskFullError of a full disk met outside the writers that name their file."""
    return write_error(cause.filename, cause, "it may be incomplete", advice)
