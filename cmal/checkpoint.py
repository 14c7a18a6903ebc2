"""What a training run keeps in its checkpoints: the run's state and the saver that writes
last.pt and best.pt (and through run_logs.py the logs), checkpoints read back, and what in an
output folder holds a previous run's work.

Checkpoints are written atomically (files.py): a crash at any moment leaves either the old or
the new file, never a broken one.
"""
import json
import os
import random
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from cmal.errors import CheckpointError, NON_FINITE_FIXES, NonFiniteError, WriteError
from cmal.files import link_or_copy, remove_partial_files, save, write_text
from cmal.run_logs import (JSON_LOG, SUMMARY, TENSORBOARD_DIR, TEST_LOG, TRAIN_LOG, TensorBoardLog,
                           final_test_step, write_logs)
from cmal.tresnet.weights import NotTorchFileError, WeightsError, check_compatible, read_checkpoint

FORMAT = "cmal-checkpoint-1"
SETTINGS_FILE = "settings.json"
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


def clear_run_files(out_dir):
    """Remove a previous run's checkpoints, logs, TensorBoard events, and the evaluation reports
    and export of its checkpoints (--overwrite), so that none of them can be mistaken for the new
    run's; returns the names removed."""
    removed = []
    for name in RUN_FILES + RUN_REPORTS + (SUPERSEDED_DIR,) + export_files(out_dir):
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
    for name in ("last.pt", "best.pt") + export_files(out_dir):
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


def export_files(out_dir):
    """The names of an export's files in out_dir, where its model.json is a cmal-export
    manifest (a model.json of some other tool is not ours to count or remove); else ()."""
    manifest = _manifest(Path(out_dir) / EXPORT_MANIFEST)
    return EXPORT_FILES if manifest is not None else ()


def _manifest(path):
    """The cmal-export manifest at `path` as a dict, or None (missing, unreadable, not ours)."""
    try:
        manifest = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith(
            "cmal-export"):
        return None
    return manifest


def derived_files(out_dir, name):
    """What in out_dir was made from its checkpoint `name` (last.pt or best.pt) and describes
    it: the --test_only report (STEM_evaluation/, not empty), and an export whose model.json
    names it."""
    out = Path(out_dir)
    report = out / f"{Path(name).stem}_evaluation"
    found = [report] if report.is_dir() and any(report.iterdir()) else []
    named = (_manifest(out / EXPORT_MANIFEST) or {}).get("checkpoint")
    # model.json keeps the path the export was given, relative to wherever it ran.
    if isinstance(named, str) and Path(named).name == name and (
            not Path(named).is_absolute() or Path(named).parent.resolve() == out.resolve()):
        found += [out / n for n in EXPORT_FILES if (out / n).exists()]
    return found


def superseded_plan(out_dir, name):
    """Where what describes checkpoint `name` of out_dir (derived_files) goes once the run
    replaces that file by another state: (folder, files), the folder superseded/STEM_epochN/
    named for the state the file holds now; None when nothing describes it. Called before the
    file is replaced (the name is read from it); moved after (set_aside), so that a failed save
    leaves everything where it was."""
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
    return dest, found


def set_aside(name, plan):
    """Carry out a superseded_plan of checkpoint `name`, saying where its files went. A move
    that fails (permissions, another filesystem) is a warning, not the end of the run: the
    checkpoint is saved already."""
    dest, found = plan
    names = ", ".join(sorted(p.name for p in found))
    try:
        dest.mkdir(parents=True)
        for path in found:
            os.replace(path, dest / path.name)
    except OSError as exc:
        print(f"warning: {name} is replaced by this run's state, and what described the "
              f"previous one ({names}) could not be moved to {dest} ({exc.strerror or exc}): "
              f"it no longer describes {name}; move it away", flush=True)
        return
    print(f"{name} is replaced by this run's state: what described the previous one ({names}) "
          f"is kept in {dest}", flush=True)


def _progress_tag(ckpt):
    epoch, position = progress(ckpt)
    return f"epoch{epoch + 1}_batch{position}" if position else f"epoch{epoch}"


def progress(ckpt):
    """How far a checkpoint's run got: (epochs finished, batches into the next)."""
    return ckpt["epoch"], (ckpt.get("stats") or {}).get("position", 0)


def describe_progress(ckpt):
    epoch, position = progress(ckpt)
    if position:
        return f"epoch {epoch + 1}, batch {position}"
    return f"the end of epoch {epoch}" if epoch else "the start of epoch 1"


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
    manifest = _manifest(path.parent / EXPORT_MANIFEST)
    return None if manifest is None else str(manifest.get("checkpoint") or "")


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


class RunSaver:
    """The files of a run in its output folder, as timm's CheckpointSaver keeps them: last.pt
    (every epoch, and inside one on request), best.pt when the combined test accuracy improves,
    and the logs rewritten from the history. Only the main process writes; every process calls
    it, since refusing non-finite weights is a decision all of them take. `init`: what
    initialised the run's network (weights.load_backbone's record, RANDOM_INIT, or None for a run
    resumed from a checkpoint older than that record), kept in settings.json and every
    checkpoint. `holdout`: with --val_split, the record of its validation images (held out of
    train, or of val/: data.holdout_record), kept in every checkpoint."""

    def __init__(self, out_dir, model, optimizer, precision, settings, classes, writes=True,
                 init=None, holdout=None):
        self.out_dir = Path(out_dir)
        self.model, self.optimizer, self.precision = model, optimizer, precision
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
                                 + (" Prefer --amp=bf16 to fp16." if self.precision.scaler else ""))
        if not self.writes:
            return
        ckpt = {"format": FORMAT, "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.precision.scaler_state(),
                **{f.name: getattr(state, f.name) for f in fields(state)},
                "settings": self.settings.to_dict(), "init": self.init, "classes": self.classes,
                "holdout": self.holdout, "rng": rng_state()}
        last = self.out_dir / "last.pt"
        replaced = ("best.pt", "last.pt") if best else ("last.pt",)
        plans = [(name, superseded_plan(self.out_dir, name)) for name in replaced]
        try:
            save(ckpt, self.out_dir / ("best.pt" if best else "last.pt"))
            if best:
                link_or_copy(self.out_dir / "best.pt", last)
        except WriteError as exc:  # best.pt is written first: last.pt is as it was either way
            raise exc.amended(outcome=f"the previous {last.name} is intact" if last.exists()
                              else "no last.pt was written yet") from None
        for name, plan in plans:
            if plan is not None:
                set_aside(name, plan)

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


def check_classes(ck, classes, path):
    """Refuse checkpoint `ck` (read from `path`) for data whose class names, or their order,
    differ from those it was trained on."""
    if ck["classes"] != classes:
        differ = sorted(set(ck["classes"]) ^ set(classes))
        raise CheckpointError(
            f"{path} was trained on other classes than this data_path's"
            + (f" (not in both: {differ[:8]})" if differ else " (same names, another order)")
            + "; point --data_path at the dataset it was trained on")
