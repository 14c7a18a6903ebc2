"""Files that a crash cannot leave broken, and the output folder they go into.

Every file is written beside its final name and renamed over it, so a crash at any moment
leaves either the old or the new file, never a broken one; a failed write is a WriteError
saying what became of the previous file. An output folder is checked before any work
(prepare_output_dir) and owned by one process at a time (RunLock).
"""
import contextlib
import errno
import fcntl
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import torch

from cmal.errors import CheckpointError, disk_full_cause, write_error

LOCK_NAME = ".run.lock"


class OutputDirError(CheckpointError):
    """An output folder that cannot take this run: not a folder, not writable, or in use."""


def prepare_output_dir(out_dir, option="--output_dir"):
    """Create `out_dir`, or check that an existing one is a folder this process can write into;
    OutputDirError says which path is at fault (`option`: the setting that named it). Cheap: runs
    before any data or model work. Returns whether the folder was created."""
    out = Path(out_dir)
    blocker = next((p for p in [out, *out.parents] if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        where = "is a file" if blocker == out else f"lies under {blocker}, which is a file"
        raise OutputDirError(f"{_named(option, out)} {where}, not a folder; choose another "
                             f"{option}")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        fix = ("free space on its device, or " if disk_full_cause(exc) else
               "make it writable, or " if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
               else "")
        raise OutputDirError(f"cannot write into {_named(option, out)} ({exc.strerror}); {fix}"
                             f"choose another {option}") from None
    return created


def _named(option, path):
    """'--output_dir=PATH' for an option, 'OUT_DIR PATH' for a positional argument."""
    return f"{option}={path}" if option.startswith("--") else f"{option} {path}"


class RunLock:
    """Ownership of an output folder by one training run at a time.

    An flock on OUT/.run.lock, which the kernel releases when its process ends however it ends,
    so a lock left by a dead run is recognised as free; the file holds the owner's process id,
    host and start time for the message a second run prints. `acquire` first prepares the
    folder (prepare_output_dir); `release` removes the lock file, and the folder too when this
    run created it and left nothing in it, so that a run that failed early leaves no trace.
    """

    def __init__(self, out_dir, owner="training run", option="--output_dir"):
        self.folder = Path(out_dir)
        self.path = self.folder / LOCK_NAME
        self.owner, self.option = owner, option  # what holds the folder, the setting naming it
        self._fd = None
        self._created = False

    def acquire(self):
        self._created = prepare_output_dir(self.folder, self.option)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 512).decode(errors="replace").strip()
                os.close(fd)
                # A lock file of this version starts with its owner's kind ("export (process
                # ..."); an older run's holds the process alone.
                if not owner.startswith(("training run (", "export (")):
                    owner = f"training run ({owner or 'starting'})"
                raise OutputDirError(
                    f"{self.folder} is in use by another {owner}; wait for it to finish or stop "
                    f"it, or choose another {self.option}") from None
            # The previous owner may have removed the file between our open and our lock: then
            # this lock is on a file nobody else sees, and the path must be opened again.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, (f"{self.owner} (process {os.getpid()} on {socket.gethostname()}, started "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')})").encode())
        self._fd = fd
        return self

    def release(self):
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # before unlocking: see acquire
        os.close(self._fd)  # closing releases the flock
        self._fd = None
        if self._created and not any(self.folder.iterdir()):
            self.folder.rmdir()


def _atomic_write(path, write):
    """Write `path` through `write(file)` into a temporary file beside it, renamed over it once
    complete; a failure to write (a full disk, a read-only folder) is a WriteError saying that
    the previous file is intact."""
    path, tmp, out = Path(path), None, None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        # mkstemp creates the file 0600; the result should be readable as the user's umask says,
        # as a plain open() would make it (colleagues on a shared server read checkpoints).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            out = _Recorded(f)
            write(out)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        recorded = out.error if out is not None else None
        cause = disk_full_cause(exc) or disk_full_cause(recorded) or \
            (exc if isinstance(exc, OSError) else None)
        if cause is None:
            raise
        raise _unwritten(path, cause) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _unwritten(path, cause):
    outcome = (f"the previous {path.name} is intact" if path.exists() else
               f"no {path.name} was written")
    return write_error(path, cause, outcome)


class _Recorded:
    """A binary file that keeps the error of its failed write (`error`): torch.save reports
    one as a RuntimeError without the errno that says the disk is full."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data):
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self):
        return self.file.flush()

    def fileno(self):
        return self.file.fileno()


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save(obj, path):
    _atomic_write(path, lambda f: torch.save(obj, f))


def write_text(path, text):
    _atomic_write(path, lambda f: f.write(text.encode()))


def link_or_copy(src, dst):
    """Make `dst` hold what `src` holds now (a hard link where possible), atomically."""
    dst = Path(dst)
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    try:
        if tmp.exists():
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise _unwritten(dst, exc) from None


def remove_partial_files(folder):
    """Delete temporary files a killed process left behind (they never replaced a real file)."""
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)

