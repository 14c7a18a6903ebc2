"""What a training run leaves on disk: checkpoints and the per-epoch logs.

Every file is written beside its final name and renamed over it, so a crash at any moment
leaves either the old or the new file, never a broken one. The logs are rewritten from the
history held in the checkpoint, so after a resume each epoch appears in them exactly once.
"""
import contextlib
import errno
import fcntl
import json
import os
import random
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cmal.errors import (NON_FINITE_FIXES, NonFiniteError, UserError, WriteError,
                         disk_full_cause, write_error)
from cmal.tensorboard import tensorboard_writer_class
from cmal.tresnet.weights import NotTorchFileError, WeightsError, check_compatible, read_checkpoint

FORMAT = "cmal-checkpoint-1"
TRAIN_LOG = "results_train.txt"
TEST_LOG = "results_test.txt"
JSON_LOG = "log.jsonl"
SUMMARY = "summary.csv"
SETTINGS_FILE = "settings.json"
TENSORBOARD_DIR = "tensorboard"


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used for this run; the message says why and what to do."""


class OutputDirError(CheckpointError):
    """An output folder that cannot take this run: not a folder, not writable, or in use."""


RUN_FILES = ("last.pt", "best.pt", TRAIN_LOG, TEST_LOG, JSON_LOG, SUMMARY, SETTINGS_FILE,
             TENSORBOARD_DIR)
# The reports --test_only writes beside the run's own checkpoints (CHECKPOINT-STEM_evaluation/):
# they describe those files, and go with them.
RUN_REPORTS = ("last_evaluation", "best_evaluation")
# What cmal-export writes (cmal/export.py takes the names from here): exported into a run's
# folder, they describe its checkpoints and go with them.
EXPORT_FILE_NAMES = {"export": "model.pt2", "torchscript": "model.ts", "onnx": "model.onnx"}
EXPORT_MANIFEST = "model.json"
EXPORT_FILES = (*EXPORT_FILE_NAMES.values(), EXPORT_MANIFEST)
# Where a run moves the report and export of a checkpoint it replaces by another state (a
# resumed or extended run): kept, but no longer beside a checkpoint they do not describe.
SUPERSEDED_DIR = "superseded"
LOCK_NAME = ".run.lock"


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


def clear_run_files(out_dir):
    """Remove a previous run's checkpoints, logs, TensorBoard events, and the evaluation reports
    and export of its checkpoints (--overwrite), so that none of them can be mistaken for the new
    run's; returns the names removed."""
    removed = []
    for name in RUN_FILES + RUN_REPORTS + (SUPERSEDED_DIR,) + EXPORT_FILES:
        path = Path(out_dir) / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.is_symlink() or path.exists():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def previous_run_files(out_dir):
    """What in `out_dir` holds a previous run's work, as names ('tensorboard/' for a folder):
    its checkpoints, logs of at least one epoch, TensorBoard events, evaluation reports and an
    export. settings.json and the empty logs of a run that ended inside its first epoch hold
    none."""
    out, found = Path(out_dir), []
    for name in ("last.pt", "best.pt") + EXPORT_FILES:
        if (out / name).exists() or (out / name).is_symlink():
            found.append(name)
    for name in (TRAIN_LOG, TEST_LOG, JSON_LOG, SUMMARY):
        try:
            lines = [line for line in (out / name).read_text(errors="replace").splitlines()
                     if line.strip()]
        except OSError:  # missing (or unreadable: not ours to judge)
            continue
        if len(lines) > (1 if name == SUMMARY else 0):  # summary.csv: more than its header
            found.append(name)
    for name in (TENSORBOARD_DIR,) + RUN_REPORTS + (SUPERSEDED_DIR,):
        folder = out / name
        if folder.is_dir() and any(not _header_only_events(f) for f in folder.iterdir()):
            found.append(name + "/")
    return found


# A TensorBoard events file holding only the header its writer puts there when the run starts
# (88 bytes with torch 2.14): a run killed before its first epoch leaves one, and it records no
# work. One scalar makes the file 127 bytes.
_EVENTS_HEADER_BYTES = 100


def _header_only_events(path):
    try:
        return (path.name.startswith("events.out.tfevents.") and path.is_file()
                and path.stat().st_size < _EVENTS_HEADER_BYTES)
    except OSError:
        return False


def derived_files(out_dir, name):
    """What in out_dir was made from its checkpoint `name` (last.pt or best.pt) and describes
    it: the --test_only report (STEM_evaluation/), and an export whose model.json names it."""
    out = Path(out_dir)
    found = [out / f"{Path(name).stem}_evaluation"]
    found = [p for p in found if p.is_dir()]
    try:
        named = json.loads((out / EXPORT_MANIFEST).read_text()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        named = None
    # model.json keeps the path the export was given, relative to wherever it ran.
    if isinstance(named, str) and Path(named).name == name and (
            not Path(named).is_absolute() or Path(named).parent.resolve() == out.resolve()):
        found += [out / n for n in EXPORT_FILES if (out / n).exists()]
    return found


def set_aside_derived(out_dir, name):
    """Before checkpoint `name` of out_dir is replaced by another state of its run: move its
    report and export (derived_files) into superseded/STEM_epochN/, named for the state they
    describe, so that nothing beside the new checkpoint describes the old one and nothing is
    deleted. Returns the folder they went to, or None when there was nothing to move."""
    found = derived_files(out_dir, name)
    if not found:
        return None
    out = Path(out_dir)
    try:  # mmap: the state's position, without reading the weights
        tag = _progress_tag(torch.load(out / name, map_location="cpu", weights_only=True,
                                       mmap=True))
    except Exception:  # unreadable or missing: still moved, under a plain name
        tag = "previous"
    dest = out / SUPERSEDED_DIR / f"{Path(name).stem}_{tag}"
    for n in range(2, 1000):
        if not dest.exists():
            break
        dest = dest.with_name(f"{Path(name).stem}_{tag}_{n}")
    dest.mkdir(parents=True)
    for path in found:
        os.replace(path, dest / path.name)
    return dest


def _progress_tag(ckpt):
    epoch, position = progress(ckpt)
    return f"epoch{epoch + 1}_batch{position}" if position else f"epoch{epoch}"


def logged_records(out_dir):
    """The epoch records of out_dir/log.jsonl (None when it cannot be read as such)."""
    try:
        text = (Path(out_dir) / JSON_LOG).read_text()
    except FileNotFoundError:
        return []
    except OSError:
        return None
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except ValueError:
        return None


def progress(ckpt):
    """How far a checkpoint's run got: (epochs finished, batches into the next)."""
    return ckpt["epoch"], (ckpt.get("stats") or {}).get("position", 0)


def describe_progress(ckpt):
    epoch, position = progress(ckpt)
    if position:
        return f"epoch {epoch + 1}, batch {position}"
    return f"the end of epoch {epoch}" if epoch else "the start of epoch 1"


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


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": _numpy_state_to_plain(np.random.get_state())}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state):
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available() and \
            len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _numpy_state_to_plain(s):
    # weights_only loading accepts tensors and plain containers, not numpy arrays.
    return [s[0], torch.from_numpy(s[1].astype(np.int64)), int(s[2]), int(s[3]), float(s[4])]


def _numpy_state_from_plain(s):
    return (s[0], s[1].numpy().astype(np.uint32), s[2], s[3], s[4])


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def load(path, option=None, hint=""):
    """A training checkpoint written by this project, read without running any code. `option`:
    the setting that named it; `hint`: what to do instead if it is some other file."""
    if not Path(path).is_file():
        raise not_a_file(path, option)
    source = _exported_from(path)
    if source is not None:
        raise CheckpointError(
            f"{path} is a file of the export described by {Path(path).parent / EXPORT_MANIFEST} "
            "(python -m cmal.tools.export), for deployment; the tools and --resume read the "
            f"training checkpoint it was exported from: pass {source or 'its last.pt or best.pt'}")
    try:
        ckpt = read_checkpoint(path)
    except NotTorchFileError:
        raise CheckpointError(f"{path} is not a PyTorch file (neither the zip archive torch.save "
                              "writes nor a pickle); pass the last.pt or best.pt that a training "
                              "run wrote") from None
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a CMAL-Net training checkpoint of this project (no '{FORMAT}' "
            f"marker); pass the last.pt or best.pt that a training run wrote{hint}")
    return ckpt


def _exported_from(path):
    """The checkpoint an export was made from ('' where its model.json does not say), if `path`
    is one of the export's files; else None. Given as a checkpoint, torch's loader would call a
    TorchScript file unsafe code and a torch.export archive corrupt."""
    path = Path(path)
    if path.name not in EXPORT_FILES:
        return None
    try:
        manifest = json.loads((path.parent / EXPORT_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith(
            "cmal-export"):
        return None
    return str(manifest.get("checkpoint") or "")


def not_a_file(path, option=None, alternative=""):
    """The CheckpointError of a checkpoint path that is a folder or nothing; `option` names the
    setting it came from, `alternative` another way to give one."""
    path = Path(path)
    given = f"{option}={path}" if option else f"checkpoint {path}"
    if path.is_dir():
        inside = [str(path / name) for name in ("last.pt", "best.pt") if (path / name).is_file()]
        return CheckpointError(
            f"{given} is a folder; pass a checkpoint file"
            + (f", such as {' or '.join(inside)}" if inside else
               " (the last.pt or best.pt of a training run; this folder holds neither)")
            + alternative)
    return CheckpointError(f"{given} does not exist; pass the last.pt or best.pt that a training "
                           f"run wrote into its output_dir{alternative}")


@dataclass
class RunState:
    """What a run carries from epoch to epoch and saves in its checkpoints. `epoch`: the next
    epoch to train (0-based); `stats`: the running sums of that epoch when it was interrupted
    midway (None at an epoch boundary); `history`: one record per finished epoch (its "epoch"
    0-based); `final_test`: with a validation split, the test result of best.pt, scored once
    after the last epoch."""
    epoch: int = 0
    stats: Optional[dict] = None
    best_acc: float = 0.0
    best_epoch: Optional[int] = None
    history: list = field(default_factory=list)
    final_test: Optional[dict] = None

    @classmethod
    def from_checkpoint(cls, ckpt):
        # Checkpoints written before a field existed hold its default.
        return cls(**{f.name: ckpt[f.name] for f in fields(cls) if f.name in ckpt})


class TensorBoardLog:
    """The per-epoch numbers as TensorBoard scalars in output_dir/tensorboard/, one step per
    epoch, counted from 1 as the console counts them."""

    TRAIN = ("train_acc", "train_loss", "loss1", "loss2", "loss3", "loss_att", "loss_concat",
             "lr", "backbone_lr")
    EVALUATED = ("acc_concat", "acc_com2", "acc_combined", "loss")

    def __init__(self, out_dir, state):
        # On resume, the events of the checkpoint's last finished epoch (and of its final test)
        # on are dropped and written again from its history: those past it were written before a
        # crash, and the last one's may never have been written (a kill between the checkpoint
        # and its events).
        first = len(state.history) or None
        if state.final_test:
            first = min(first or state.epoch, final_test_step(state))
        self.writer = tensorboard_writer_class()(str(Path(out_dir) / TENSORBOARD_DIR),
                                                 purge_step=first)
        for record in state.history[first - 1:] if first else ():
            self.epoch(record)
        if state.final_test:
            self.scalars("final_test", state.final_test, final_test_step(state))

    def epoch(self, record):
        step = record["epoch"] + 1
        for key in self.TRAIN:
            self.writer.add_scalar(f"train/{key}", record[key], step)
        for split in ("val", "test"):
            self.scalars(split, record.get(split), step)
        self.writer.flush()

    def scalars(self, split, result, step):
        for key in self.EVALUATED if result else ():
            self.writer.add_scalar(f"{split}/{key}", result[key], step)

    def close(self):
        self.writer.close()


class RunSaver:
    """The files of a run in its output folder, as timm's CheckpointSaver keeps them: last.pt
    (every epoch, and inside one on request), best.pt when the combined test accuracy improves,
    and the logs rewritten from the history. Only the main process writes; every process calls
    it, since refusing non-finite weights is a decision all of them take. `init`: what
    initialised the run's network (weights.load_backbone's record, RANDOM_INIT, or None for a run
    resumed from a checkpoint older than that record), kept in settings.json and every
    checkpoint. `holdout`: with --val_split=F, the record of the images held out for
    validation (data.holdout_record), kept in every checkpoint."""

    def __init__(self, out_dir, model, optimizer, scaler, settings, classes, writes=True,
                 init=None, holdout=None):
        self.out_dir = Path(out_dir)
        self.model, self.optimizer, self.scaler = model, optimizer, scaler
        self.settings, self.classes, self.writes = settings, classes, writes
        self.init, self.holdout = init, holdout
        self.tensorboard = None

    def start(self, state):
        """A run (re)starts: leftovers of a killed write go, and the logs hold only the
        epochs the checkpoint holds (not those of an epoch that did not finish saving)."""
        if self.writes:
            remove_partial_files(self.out_dir)
            write_text(self.out_dir / SETTINGS_FILE,
                       json.dumps({**self.settings.to_dict(), "init": self.init}, indent=2,
                                  sort_keys=True) + "\n")
            write_logs(self.out_dir, state)
            if self.settings.tensorboard:
                self.tensorboard = TensorBoardLog(self.out_dir, state)

    def save(self, state, best=False):
        """last.pt of `state`; a new best is written to best.pt first and last.pt made a link
        to it, so that a crash in between leaves last.pt behind best.pt, never ahead of it."""
        if not torch.stack([t.isfinite().all() for t in self.model.state_dict().values()
                            if t.is_floating_point()]).all():
            raise NonFiniteError(f"the weights hold NaN or infinite values at epoch "
                                 f"{state.epoch + 1}; the run is stopped and no checkpoint was "
                                 f"written from this state. {NON_FINITE_FIXES}"
                                 + (" Prefer --amp=bf16 to fp16." if self.scaler else ""))
        if not self.writes:
            return
        ckpt = {"format": FORMAT, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None,
                **{f.name: getattr(state, f.name) for f in fields(state)},
                "settings": self.settings.to_dict(), "init": self.init, "classes": self.classes,
                "holdout": self.holdout, "rng": rng_state()}
        last = self.out_dir / "last.pt"
        for name in ("best.pt", "last.pt") if best else ("last.pt",):
            moved = set_aside_derived(self.out_dir, name)
            if moved is not None:
                print(f"{name} is replaced by this run's state: what described the previous "
                      f"one ({', '.join(sorted(p.name for p in moved.iterdir()))}) is kept in "
                      f"{moved}", flush=True)
        try:
            save(ckpt, self.out_dir / ("best.pt" if best else "last.pt"))
            if best:
                link_or_copy(self.out_dir / "best.pt", last)
        except WriteError as exc:  # best.pt is written first: last.pt is as it was either way
            raise exc.amended(outcome=f"the previous {last.name} is intact" if last.exists()
                              else "no last.pt was written yet") from None

    def end_epoch(self, state, best):
        """The checkpoint and the logs of a finished epoch (`state` already past it)."""
        self.save(state, best)
        if self.writes:
            write_logs(self.out_dir, state)
            if self.tensorboard:
                self.tensorboard.epoch(state.history[-1])

    def end_run(self, state, tested=False):
        """The run's last save: with `tested` (the final test of best.pt under --val_split was
        just scored) last.pt holding it and its TensorBoard point; the logs; the TensorBoard
        file closed."""
        if tested:
            self.save(state)
        if self.writes:
            write_logs(self.out_dir, state)
            if self.tensorboard:
                if tested:
                    self.tensorboard.scalars("final_test", state.final_test,
                                             final_test_step(state))
                self.tensorboard.close()


def final_test_step(state):
    """The TensorBoard step of a run's final test: best.pt's epoch, or the last one's where
    no epoch scored above 0 % on validation."""
    return state.best_epoch + 1 if state.best_epoch is not None else state.epoch


def mid_epoch(state, epoch, stats):
    """`state` as saved inside `epoch`, with its running sums `stats`."""
    return replace(state, epoch=epoch, stats=stats)


def load_model_state(model, ckpt, path):
    """Load the checkpoint's weights, refusing another architecture or class count by name."""
    # The network was built from the checkpoint's own settings: a mismatch is in the file.
    try:
        check_compatible(model.state_dict(), ckpt["model"], str(path),
                         fix=f"The network was built from the settings recorded in {path}, so "
                             "its weights were altered or written by another version of this "
                             "project; use another checkpoint.")
    except WeightsError as exc:
        raise CheckpointError(str(exc)) from None
    model.load_state_dict(ckpt["model"])


def train_line(r):
    return ("Iteration %d | train_acc = %.5f | train_loss = %.5f | Loss1: %.3f | Loss2: %.5f | "
            "Loss3: %.5f | Loss_ATT: %.5f | Loss_concat: %.5f |\n"
            % (r["epoch"], r["train_acc"], r["train_loss"], r["loss1"], r["loss2"], r["loss3"],
               r["loss_att"], r["loss_concat"]))


def test_line(epoch, test):
    return "Iteration %d, test_acc_combined = %.5f, test_loss = %.6f\n" % (
        epoch, test["acc_combined"], test["loss"])


def evaluated(record):
    """The evaluation of an epoch record: on the validation split where the run holds one out,
    else on the test split (the reference's protocol); None on epochs not evaluated."""
    return record.get("val") or record.get("test")


# summary.csv: timm's columns where they apply, then the paper's three accuracies of the
# evaluated split (validation where the run holds one out, else test); one row per epoch,
# numbered from 1; the evaluation cells are empty on epochs that were not evaluated.
SUMMARY_COLUMNS = ("epoch", "train_loss", "train_acc", "eval_loss", "eval_acc_concat",
                   "eval_acc_com2", "eval_acc_combined", "lr", "backbone_lr", "time")


def summary_csv(history):
    import csv
    import io
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(SUMMARY_COLUMNS)
    for r in history:
        t = evaluated(r) or {}
        writer.writerow([r["epoch"] + 1, f"{r['train_loss']:.6f}", f"{r['train_acc']:.4f}",
                         *(f"{t[k]:.6f}" if k in t else "" for k in ("loss", "acc_concat",
                                                                       "acc_com2",
                                                                       "acc_combined")),
                         f"{r['lr']:.6g}", f"{r['backbone_lr']:.6g}", f"{r['time']:.1f}"])
    return out.getvalue()


def write_logs(out_dir, state):
    """results_train.txt and results_test.txt in the reference formats (epochs from 0, as the
    reference numbers them; with a validation split, results_test.txt holds the one test of
    best.pt), log.jsonl (epochs from 1, as everything else a person reads) and summary.csv."""
    out_dir, history = Path(out_dir), state.history
    write_text(out_dir / TRAIN_LOG, "".join(train_line(r) for r in history))
    tests = [(r["epoch"], r["test"]) for r in history if r.get("test")]
    if state.final_test:
        tests.append((state.best_epoch if state.best_epoch is not None else len(history) - 1,
                      state.final_test))
    write_text(out_dir / TEST_LOG, "".join(test_line(e, t) for e, t in tests))
    write_text(out_dir / JSON_LOG, "".join(json.dumps({**r, "epoch": r["epoch"] + 1},
                                                      sort_keys=True) + "\n" for r in history))
    write_text(out_dir / SUMMARY, summary_csv(history))
