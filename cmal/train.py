"""Train and evaluate CMAL-Net on any train/test image-folder dataset.

    python train.py --data_path=DATA --num_classes=N [--weights=in21k] [--resume] ...
    torchrun --nproc_per_node=K train.py ...        (several GPUs, or CPU processes)

The dataset scripts (train_Stanford_Cars_TResNet_L.py, ...) call main() with their own defaults;
`--help` lists every setting (settings.py). A run writes into output_dir: last.pt (every epoch),
best.pt (best combined test accuracy; with --val_split, best on validation), results_train.txt /
results_test.txt (the reference's formats), log.jsonl (one JSON record per epoch), summary.csv,
settings.json (the settings, and under "init" what initialised the network, as the checkpoints
record it), and with --tensorboard the event files in tensorboard/.
"""
import json
import os
import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn

from cmal import checkpoint as ckpt_io
from cmal import run_logs
from cmal import distributed
from cmal import localisation, methods
from cmal import settings
from cmal.data import build_loaders, holdout_change, holdout_method_of, mix_seed, shutdown_workers
from cmal.folders import VAL_SPLIT, DatasetError
from cmal.checkpoint import check_classes
from cmal.cuda_graph import GraphedScores
from cmal.distributed import log
from cmal.engine import evaluate, new_epoch_stats, reduce_stats, summarise_train, train_one_epoch
from cmal.files import RunLock
from cmal.errors import (DiskFullError, WriteError, disk_full_cause, run_command,
                         unnamed_disk_full)
from cmal.inference import model_of
from cmal.model import compile_network
from cmal.precision import Precision
from cmal.test_only import evaluated_path, test_only
from cmal.optimizer import (load_optimizer_state, make_optimizer, set_hyperparameters,
                            set_learning_rates, zero_fill_grads)
from cmal.tresnet.weights import resolve_weights
from cmal.tresnet.weights import init_lines


def should_evaluate(epoch, cfg):
    if epoch == cfg.epochs - 1:
        return True
    if cfg.eval_every:
        return (epoch + 1) % cfg.eval_every == 0
    # The reference evaluates when epoch < 5 or epoch >= 100, for 200 epochs.
    return epoch < 5 or epoch >= cfg.epochs // 2


def selection_split(cfg):
    """The split best.pt is chosen on: validation with --val_split, else test (the reference's
    protocol)."""
    return "test" if cfg.val_split == "none" else "validation"


def epoch_line(record, cfg, best):
    method = methods.method_of(cfg)
    line = (f"epoch {record['epoch'] + 1:3d}/{cfg.epochs} | train acc {record['train_acc']:6.2f}% "
            f"loss {record['train_loss']:.4f}" + method.losses_text(record))
    t = run_logs.evaluated(record)
    if t:
        line += " | " + method.scores_text(t, best, "val" if record.get("val") else "test")
    if t and t.get("localisation"):
        line += " | " + short_localisation(t["localisation"])
    if record.get("skipped"):
        line += f" | {record['skipped']} bad images skipped"
    return line + f" | {record['time']:.0f}s"


def short_localisation(loc):
    """The epoch line's part of a localisation record: how often each crop box holds the
    annotated part's centre (experts 1, 2, 3, joint)."""
    return "part in crop " + "/".join(f"{loc[c]['pointing']:.0f}" for c in localisation.CROPS) + "%"


class StopRequest:
    """SIGINT / SIGTERM: finish the current iteration, save, and stop. A second one stops now."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if distributed.is_main():  # os.write: print() is not safe inside a signal handler
            os.write(1, f"\n{self.signal} received: stopping after this iteration and saving a "
                        "checkpoint (send it again to stop at once)\n".encode())

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self):
        local = self.signal is not None
        return distributed.all_reduce_sum([float(local)])[0] > 0 if distributed.is_distributed() else local

    @property
    def name(self):
        # Under torchrun a signal may reach only some processes; the others stop with them.
        return self.signal or "a signal to another process"

    def exit_status(self):
        return 128 + signal.Signals[self.signal or "SIGTERM"].value


def resume_path(cfg):
    """The checkpoint to continue from, or None for a fresh start."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        path = Path(cfg.output_dir) / "last.pt"
        if not path.exists():
            if cfg.extend:
                raise settings.SettingsError(
                    f"--extend continues a finished run, and {path} does not exist: give the "
                    "run's checkpoint with --resume=PATH (or --output_dir=its folder), or leave "
                    "out --extend to start a new run")
            return None
        return path
    path = Path(cfg.resume)
    if not path.is_file():
        raise ckpt_io.not_a_file(path, "--resume", f", or give --resume no value to continue "
                                                   f"{Path(cfg.output_dir) / 'last.pt'}")
    return path


def restore(ck, path, cfg, classes, model, optimizer, precision):
    """Load a checkpoint into the run's objects; return the RunState it holds."""
    check_classes(ck, classes, path)
    ckpt_io.load_model_state(model, ck, path)
    load_optimizer_state(optimizer, ck["optimizer"])
    # Base rates, momentum and weight decay of the run's settings, which are the checkpoint's
    # (settings_of_checkpoint); each iteration then sets its scheduled rate.
    set_hyperparameters(optimizer, cfg.lr, cfg.backbone_lr, cfg.momentum, cfg.weight_decay)
    precision.load_scaler_state(ck.get("scaler"))
    state = ckpt_io.RunState.from_checkpoint(ck)
    if cfg.extend:  # more epochs may choose another best.pt: its test is scored anew
        state.final_test = None
    zero_fill_grads(model)
    if state.stats:  # the batch size and seed are the checkpoint's (settings_of_checkpoint)
        ckpt_io.restore_rng(ck["rng"])
        if not distributed.is_main():  # the saved sums cover all processes: count them once
            state.stats = {**new_epoch_stats(), "position": state.stats["position"]}
    log(f"resumed from {path}: epoch {state.epoch + 1}"
        + (f", batch {state.stats['position']}" if state.stats else "")
        + f", best {methods.method_of(cfg).headline} "
        + f"{selection_split(cfg)} accuracy {state.best_acc:.2f}%")
    return state


def run(cfg, given=frozenset()):
    """Train (or with --test_only evaluate) as `cfg` says; return the exit status. `given`: the
    settings named on the command line (a resumed run takes the others from its checkpoint).

    The output folder is checked and locked first, then the data scanned: a run that cannot
    save stops before any expensive work. Loader processes end with the run, however it ends.
    """
    device = distributed.setup_device(cfg)
    lock = None
    if not cfg.test_only and distributed.is_main():
        lock = RunLock(cfg.output_dir).acquire()
    try:
        path = evaluated_path(cfg) if cfg.test_only else resume_path(cfg)
        ck = load_checkpoint(path, cfg) if path else None
        if ck is not None:
            cfg = settings_of_checkpoint(cfg, ck, given, path)
        overwrites = False
        if not cfg.test_only:
            check_resume_or_overwrite(cfg, path, given)
            if ck is not None and finished(cfg, ck):
                log(finished_line(cfg, ck, path))
                return 0
            overwrites = check_previous_run(cfg, path, ck)
            if cfg.resume == "auto" and path is None:
                log(f"--resume: {Path(cfg.output_dir) / 'last.pt'} does not exist yet; "
                    "starting a new run")
        torch.manual_seed(cfg.seed)
        # A checkpoint's classes are checked by name (check_classes), whose fix applies to it:
        # another --data_path, not another --num_classes.
        scanned = cfg if ck is None else replace(cfg, num_classes=None)
        resumed = None if cfg.test_only else ck
        loaders = build_loaders(scanned, distributed.rank(), distributed.world_size(),
                                pin_memory=device.type == "cuda",
                                holdout_method=holdout_method_of(resumed))
        try:
            check_holdout(cfg, resumed, loaders.holdout, path)
            return _run(cfg, device, path, ck, loaders, overwrites)
        finally:
            shutdown_workers(*(loader for loader in (loaders.train, loaders.test, loaders.val)
                               if loader is not None))
    finally:
        if lock is not None:
            lock.release()


def load_checkpoint(path, cfg):
    """The checkpoint a run continues or --test_only scores, refusing other files by name."""
    option = "--resume" if cfg.resume and cfg.resume != "auto" else None
    hint = "" if cfg.test_only else (" (to start a new run from TResNet weights, pass them with "
                                     "--weights instead)")
    return ckpt_io.load(path, option, hint)


def check_holdout(cfg, ck, holdout, path):
    """A resumed run validates on the images its checkpoint validated on: one whose hold-out
    would differ (images of train added, removed or renamed), or whose val/ folder holds other
    images (--val_split=folder), stops, saying how many changed, unless --accept_new_holdout."""
    if ck is None or holdout is None:
        if cfg.accept_new_holdout:
            log("note: --accept_new_holdout changes nothing here: it lets a run resumed with "
                "--val_split continue on other validation images than its checkpoint recorded")
        return
    folder = cfg.val_split == "folder"
    source = Path(cfg.data_path) / (VAL_SPLIT if folder else "train")
    if not ck.get("holdout"):
        log(f"note: {path} does not record its validation images (it predates the record): "
            + ("" if folder else "they are drawn again as that run drew them, which ")
            + f"cannot tell whether the images of {source} are still those it was "
            + ("validated" if folder else "trained") + " with")
        return
    change = holdout_change(ck["holdout"], holdout)
    if change is None:
        return
    if not cfg.accept_new_holdout:
        raise DatasetError(
            (f"{source} holds other images than {path} was validated on" if folder else
             f"--val_split={cfg.val_split} holds out other images of {source} than {path} was "
             "trained with")
            + f": {change}; put the images back as they were, or pass --accept_new_holdout to "
            "validate on the new " + ("images" if folder else "hold-out") + " from here on")
    log(f"--accept_new_holdout: validating on the new hold-out from here on: {change} (the "
        "best accuracy so far was measured on the old one)")


def settings_of_checkpoint(cfg, ck, given, path):
    """The settings a resumed run or an evaluation takes from its checkpoint (see
    settings.from_checkpoint_for), and --extend's conditions."""
    trained = ck["settings"]["epochs"]
    unfinished = ck["epoch"] < trained or bool(ck["stats"])
    cfg, notes = settings.from_checkpoint_for(cfg, ck["settings"], given, path, cfg.test_only,
                                              stopped_in=(ckpt_io.describe_progress(ck) if unfinished
                                                          else None))
    if cfg.extend and not cfg.test_only:
        if unfinished:
            raise settings.SettingsError(
                f"--extend continues a finished run, and {path} stopped in epoch "
                f"{ck['epoch'] + 1} of {trained}: resume it without --extend first")
        # A default or a script's value would retrain to a number nobody chose (200).
        if "epochs" not in given:
            raise settings.SettingsError(
                f"--extend needs --epochs=N on the command line, N above the {trained} epochs "
                f"{path} was trained for")
        if cfg.epochs <= trained:
            raise settings.SettingsError(f"--extend needs --epochs above the {trained} that "
                                         f"{path} was trained for, got {cfg.epochs}")
        notes.insert(0, f"epochs={trained}, extended to {cfg.epochs} (--extend)")
    if notes:
        log(f"settings from {path}: " + ", ".join(notes))
    return cfg


def finished(cfg, ck):
    """Whether a checkpoint holds a run with nothing left to do at its own settings (`cfg`):
    every epoch trained and, when best.pt is chosen on validation, its test scored."""
    return (not cfg.extend and not ck["stats"] and ck["epoch"] >= cfg.epochs
            and (selection_split(cfg) == "test" or ck.get("final_test") is not None))


def finished_line(cfg, ck, path):
    """What --resume of a finished run says instead of training: its result and how to train
    it further."""
    best, final = ck.get("best_epoch"), ck.get("final_test")
    out_dir = Path(cfg.output_dir)
    how = "--resume" if _same_file(path, out_dir / "last.pt") else f"--resume={path}"
    return (f"{path} holds a finished run of {cfg.epochs} epochs: best "
            f"{methods.method_of(cfg).headline} {selection_split(cfg)} accuracy {ck['best_acc']:.2f}%"
            + (f" at epoch {best + 1}" if best is not None else "")
            + (f", its test accuracy (scored once) {final['acc_combined']:.2f}%" if final else "")
            + f"; nothing to train, nothing written. To train it further: {how} --extend "
            f"--epochs=N (N above {cfg.epochs})"
            # Its own folder holds the run further on (see check_previous_run).
            + (" with another --output_dir" if how != "--resume" and own_checkpoint(path, out_dir)
               else ""))


def check_previous_run(cfg, path, ck):
    """Whether this run replaces the work of a previous one in output_dir (--overwrite: its
    files are then removed once every input of this run has been checked, see Training).

    A run may write into a folder that holds nothing trained, or the run it continues: its
    own last.pt, or checkpoints and logs that `ck` (read from `path`) passed through. Anything
    else would be replaced: a new run, or a resumed one from elsewhere, needs --overwrite; a
    resume from the folder's own best.pt, which would retrain the epochs after it, is refused."""
    out_dir = Path(cfg.output_dir)
    own = path is not None and own_checkpoint(path, out_dir)
    if path is not None and _same_file(path, out_dir / "last.pt"):
        found = []
    else:
        found = ckpt_io.previous_run_files(out_dir)
    if found and path is not None and continues_folder(out_dir, ck):
        found = []
    if found and own:
        raise ckpt_io.CheckpointError(rewind_message(out_dir, path, ck))
    if not found:
        return False
    if cfg.overwrite:
        return True
    if path is not None:
        last = _folder_checkpoints(out_dir).get("last.pt")
        further = last is not None and leads_to(ck, last)  # an older copy of that run
        raise ckpt_io.CheckpointError(
            f"{out_dir} already holds a run ({', '.join(found)}) that resuming {path} there "
            "would replace" + (f" (the same run, further on: {ckpt_io.describe_progress(last)})"
                               if further else "")
            + ": " + ("continue it with --resume, " if further else "")
            + "choose another --output_dir, or pass --overwrite to replace it")
    raise ckpt_io.CheckpointError(
        f"{out_dir} already holds a run ({', '.join(found)}): "
        + continue_hint(out_dir) + "start a new one with --overwrite (which removes those "
        "files) or another --output_dir")


def check_resume_or_overwrite(cfg, path, given):
    """Refuse --overwrite and --resume of the folder's own run both on the command line: one
    starts a new run, the other continues the old one. (A script's overwrite=True, as the
    demo's, gives way to --resume.)"""
    if path is not None and cfg.overwrite and "overwrite" in given and \
            own_checkpoint(path, Path(cfg.output_dir)):
        raise settings.SettingsError(
            f"--overwrite starts a new run in {cfg.output_dir}, replacing the one there, and "
            f"--resume={path} continues that run: leave out one of them")


def own_checkpoint(path, out_dir):
    """Whether `path` is the last.pt or best.pt of out_dir, which --overwrite would remove."""
    return any(_same_file(path, out_dir / name)
               or Path(path).resolve() == (out_dir / name).resolve()
               for name in ("last.pt", "best.pt"))


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _folder_checkpoints(out_dir):
    """{name: checkpoint} of out_dir's last.pt and best.pt (None where one cannot be read)."""
    found = {}
    for name in ("last.pt", "best.pt"):
        if (out_dir / name).exists():
            try:
                found[name] = ckpt_io.load(out_dir / name)
            except ckpt_io.CheckpointError:
                found[name] = None
    return found


def continues_folder(out_dir, ck):
    """Whether the run of checkpoint `ck` passed through everything out_dir holds: each of its
    checkpoints is a state of that run at or before `ck`, and log.jsonl records a first part of
    `ck`'s epochs. Resuming `ck` there then replaces nothing it does not reproduce."""
    checkpoints = _folder_checkpoints(out_dir)
    logged = run_logs.logged_records(out_dir)
    if logged is None or not (checkpoints or logged):
        return False  # unreadable, or only reports and events of a run nothing identifies
    return (all(c is not None and leads_to(c, ck) for c in checkpoints.values())
            and logged == logged_form(ck.get("history", []))[:len(logged)])


def leads_to(earlier, later):
    """Whether checkpoint `earlier` is a state the run of checkpoint `later` passed through (or
    `later` itself): the same computation, its epoch records a first part of `later`'s, and not
    further on."""
    kept = set(settings.NAMES) - settings.CHANGEABLE_ON_RESUME - {"epochs"}  # --extend

    def computation(ck):
        values = settings.Settings.from_checkpoint(ck["settings"]).to_dict()
        return {k: values[k] for k in kept}
    history = earlier.get("history", [])
    return (ckpt_io.progress(earlier) <= ckpt_io.progress(later)
            and later.get("history", [])[:len(history)] == history
            and computation(earlier) == computation(later))


def logged_form(history):
    """The epoch records of a history as log.jsonl holds them once read back."""
    return [json.loads(json.dumps({**r, "epoch": r["epoch"] + 1}, sort_keys=True))
            for r in history]


def rewind_message(out_dir, path, ck):
    """Why resuming from a folder's own best.pt (or an older last.pt) is refused: what of the
    run it would replace, and what to do instead."""
    beyond = []
    last = _folder_checkpoints(out_dir).get("last.pt")
    if last is not None and ckpt_io.progress(last) > ckpt_io.progress(ck):
        beyond.append(f"last.pt at {ckpt_io.describe_progress(last)}")
    logged, trained = run_logs.logged_records(out_dir) or [], len(ck.get("history", []))
    if len(logged) > trained:
        beyond.append(f"the records of epochs {trained + 1}-{len(logged)}")
    what = " and ".join(beyond) or "files of another run"
    return (f"--resume={path} would take the run in {out_dir} back to "
            f"{ckpt_io.describe_progress(ck)} and retrain from there, replacing {what}: "
            + ("continue the run with --resume (from last.pt), or " if last is not None else "")
            + f"start a branch from {Path(path).name} with another --output_dir")


def continue_hint(out_dir):
    """How a refused new run could continue the folder's run instead, or ''."""
    if (out_dir / "last.pt").exists():
        return "continue it with --resume, or "
    best = _folder_checkpoints(out_dir).get("best.pt")
    if best is not None and continues_folder(out_dir, best):
        return (f"continue it from best.pt ({ckpt_io.describe_progress(best)}; there is no "
                f"last.pt) with --resume={out_dir / 'best.pt'}, or ")
    return ""


def _run(cfg, device, path, ck, loaders, overwrites=False):
    cfg.num_classes = cfg.num_classes or len(loaders.classes)
    if cfg.test_only:
        return test_only(cfg, device, ck, path, loaders.test)
    if not path and cfg.weights:
        if distributed.is_main():  # one download, not one per process
            resolve_weights(cfg.weights)
        distributed.barrier()
    try:
        return Training(cfg, device, path, ck, loaders, overwrites).fit()
    except (OSError, RuntimeError) as exc:  # TensorBoard's writer names no file
        cause = disk_full_cause(exc)
        if cause is None:
            raise
        raise resumable(unnamed_disk_full(cause), cfg.output_dir) from None
    except WriteError as exc:
        raise resumable(exc, cfg.output_dir) from None


def resumable(exc, out_dir):
    """A failed write of a training run, advising how to continue: the files it keeps were
    written atomically, so the run resumes from its last complete checkpoint."""
    fix = "free space" if isinstance(exc, DiskFullError) else f"make {out_dir} writable"
    return exc.amended(advice=f"{fix}, then continue the run with --resume")


class Training:
    """One training run: its network, optimizer, data, saver and state, from a fresh start or
    from a checkpoint; `fit` trains the remaining epochs and decides how the run ends."""

    def __init__(self, cfg, device, path, ck, loaders, overwrites=False):
        self.cfg, self.device = cfg, device
        self.train_loader, self.test_loader = loaders.train, loaders.test
        # Where best.pt is chosen: a validation split (--val_split), else test (the reference).
        self.selection_loader = loaders.test if loaders.val is None else loaders.val
        classes = loaders.classes
        self.precision = Precision(cfg.amp, device)  # from the checkpoint's settings on resume
        self.criterion = nn.CrossEntropyLoss()
        graphs = settings.use_cuda_graph(cfg, device)
        self.method = methods.method_of(cfg)
        model = self.method.build(cfg, self.precision, weights=None if path else cfg.weights,
                                  cuda_graph=graphs)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = make_optimizer(model, cfg.lr, cfg.backbone_lr, cfg.momentum,
                                        cfg.weight_decay, cfg.sgd)
        self.state = restore(ck, path, cfg, classes, model, self.optimizer, self.precision) \
            if ck is not None else ckpt_io.RunState()
        # What initialised the network: this run's backbone weights, or for a resumed run what it
        # started from (None in a checkpoint written before runs recorded it). The first lines
        # of a new run, after the resume line of a resumed one.
        self.init = model.init_record if ck is None else ck.get("init")
        for line in init_lines(self.init):
            log(line)
        self.saver = ckpt_io.RunSaver(cfg.output_dir, model, self.optimizer, self.precision, cfg,
                                      classes, writes=distributed.is_main(), init=self.init,
                                      holdout=loaders.holdout)
        best = Path(cfg.output_dir) / "best.pt"
        if self.validated() and self.state.best_epoch is not None and (
                overwrites or not best.exists()):
            # The run's test is scored with best.pt at the end: it must be this folder's.
            where = f"the folder {path} was saved in"
            raise ckpt_io.CheckpointError(
                f"{best} is "
                + ("of the run --overwrite would replace" if overwrites else "missing")
                + ", and this run chooses its best network on validation and scores it on test "
                "at the end: "
                + (f"resume into a new --output_dir holding a copy of the best.pt of {where}, "
                   if overwrites else f"copy the best.pt of {where} into {cfg.output_dir}, ")
                + "or resume with --output_dir set to that folder")
        if overwrites:
            # --overwrite: only now, with the data scanned and the weights and the checkpoint
            # read, so that a mistake in this run's inputs leaves the previous run whole.
            if distributed.is_main():
                removed = ckpt_io.clear_run_files(cfg.output_dir)
                log(f"--overwrite: removed the previous run's {', '.join(removed)} from "
                    f"{cfg.output_dir}")
            distributed.barrier()
        self.saver.start(self.state)
        self.net = self._wrap(model)
        self.progress = settings.show_progress(cfg) and distributed.is_main()
        if cfg.cuda_graph == "true" and not graphs:
            log(f"--cuda_graph=true: no CUDA graphs on {device}; every iteration runs eagerly")
        self.iteration = self.method.iteration(cfg, cuda_graph=graphs)
        self.scores = GraphedScores(self.precision) if graphs else None
        log(f"{self.method.describe(cfg)}: {len(loaders.train.dataset)} train / "
            + (f"{len(loaders.val.dataset)} validation / " if loaders.val else "")
            + f"{len(loaders.test.dataset)} test images, {len(classes)} classes, {cfg.epochs} "
            f"epochs, batch {cfg.batch_size}, device {device}"
            + (f" x {distributed.world_size()} processes" if distributed.is_distributed() else ""))

    def _wrap(self, model):
        net = model
        if distributed.is_distributed():
            # Each of the five passes uses only part of the heads: the others get no gradient.
            net = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True)
        if self.cfg.compile:
            cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "/tmp/torchinductor_<user>")
            log(f"--compile: the first iteration of each input size compiles the network "
                f"(minutes on a GPU; the kernels are cached in {cache}, so later runs start "
                "faster)")
            net = compile_network(net)
        return net

    def fit(self):
        """Train to the last epoch or until a signal; the one place that says how the run
        ended and returns its exit status."""
        cfg, out_dir = self.cfg, Path(self.cfg.output_dir)
        with StopRequest() as stop:
            for epoch in range(self.state.epoch, cfg.epochs):
                finished = self.epoch(epoch, stop)
                if not finished or stop.requested():
                    where = (f"at epoch {epoch + 1}, batch {self.state.stats['position']}"
                             if not finished else f"after epoch {epoch + 1}")
                    log(f"stopped by {stop.name} {where}; {out_dir / 'last.pt'} is saved: "
                        "continue with --resume")
                    return stop.exit_status()
            scored_now = self.validated() and self.state.final_test is None
            if scored_now and not self.final_test(stop):
                log(f"stopped by {stop.name} while scoring the best network on test; continue "
                    "with --resume to score it")
                return stop.exit_status()
        self.saver.end_run(self.state, scored_now)
        best = self.state
        log(f"done: best {methods.method_of(cfg).headline} {selection_split(cfg)} accuracy {best.best_acc:.2f}%"
            + (f" at epoch {best.best_epoch + 1}" if best.best_epoch is not None else "")
            + (f"; its test accuracy (scored once): {methods.method_of(cfg).headline} "
               f"{best.final_test['acc_combined']:.2f}%" if best.final_test else "")
            + f"; checkpoints and logs in {out_dir}")
        return 0

    def validated(self):
        return selection_split(self.cfg) == "validation"

    def final_test(self, stop):
        """Score best.pt (the epoch best on validation) on the test split, once; False when a
        signal stopped it."""
        path, state = Path(self.cfg.output_dir) / "best.pt", self.state
        # A network of its own: the run's keeps the last epoch's weights, which last.pt holds.
        net = self.net if state.best_epoch is None else \
            model_of(ckpt_io.load(path), path, self.device, self.precision)
        test = evaluate(net, self.test_loader, self.criterion, self.device, self.precision,
                        self.cfg.channels_last, progress=self.progress,
                        should_stop=lambda: stop.signal is not None, scores=self.scores)
        if test is None:
            return False
        state.final_test = test
        which = (f"best.pt (epoch {state.best_epoch + 1}, chosen on validation)"
                 if state.best_epoch is not None else
                 f"the last epoch's network ({state.epoch}; no epoch scored above 0 % on "
                 "validation, so there is no best.pt)")
        log(f"{which} on test, scored once: {self.method.final_text(test)}")
        return True

    def epoch(self, epoch, stop):
        """Train (the rest of) one epoch, evaluate it when due, and save; False when a signal
        stopped it midway (its state is then saved as a mid-epoch checkpoint)."""
        cfg, state = self.cfg, self.state
        stats = state.stats or new_epoch_stats()
        if not state.stats:
            # Each epoch's crop choices depend on (seed, epoch) only, so that an epoch
            # restarted after a crash repeats exactly.
            torch.manual_seed(mix_seed(cfg.seed, epoch, 2))
        # Every iteration sets these rates again; set here too, an epoch resumed with no batch
        # left (stopped in its evaluation) would record and save the base rates of `restore`.
        set_learning_rates(self.optimizer, epoch, cfg.epochs)
        per_rank_batch = cfg.batch_size // distributed.world_size()
        self.train_loader.sampler.set_epoch(epoch, start=stats["position"] * per_rank_batch)
        t0 = time.time()

        def after_batch(stats):
            if stop.requested():
                return True
            if cfg.save_every and stats["position"] % cfg.save_every == 0:
                self.saver.save(ckpt_io.mid_epoch(state, epoch, reduce_stats(stats)))
            return False

        stats, finished = train_one_epoch(
            self.net, self.optimizer, self.train_loader, self.criterion, self.device, epoch,
            cfg.epochs, stats=stats, precision=self.precision,
            channels_last=cfg.channels_last, after_batch=after_batch, progress=self.progress,
            iteration=self.iteration)
        distributed.broadcast_buffers(self.model)
        scored = None
        if finished and should_evaluate(epoch, cfg):
            # A signal during evaluation stops it: the epoch's training is saved below and the
            # evaluation runs again on resume.
            t_test = time.time()
            scored = evaluate(self.net, self.selection_loader, self.criterion, self.device,
                              self.precision, cfg.channels_last, progress=self.progress,
                              should_stop=lambda: stop.signal is not None, scores=self.scores)
            finished = scored is not None
            if finished:
                scored["time"] = time.time() - t_test  # part of the epoch's "time" below
        if not finished:
            state.stats = reduce_stats(stats)
            self.saver.save(ckpt_io.mid_epoch(state, epoch, state.stats))
            return False
        record = {"epoch": epoch, **summarise_train(stats),
                  "lr": self.optimizer.param_groups[0]["lr"],
                  "backbone_lr": self.optimizer.param_groups[-1]["lr"]}
        if scored is not None:
            record["val" if self.validated() else "test"] = scored
        record["time"] = time.time() - t0
        state.history.append(record)
        is_best = scored is not None and scored["acc_combined"] > state.best_acc
        if is_best:
            state.best_acc, state.best_epoch = scored["acc_combined"], epoch
        state.epoch, state.stats = epoch + 1, None
        self.saver.end_epoch(state, best=is_best)
        log(epoch_line(record, cfg, state.best_acc))
        return True


def main(defaults=None, argv=None, description=None):
    """Entry point of every training script: parse settings, run, and turn known failures into
    one clear line and a non-zero exit status."""
    cfg = settings.parse(defaults, argv, description or __doc__.split("\n")[0])
    given = settings.given_on_command_line(sys.argv[1:] if argv is None else argv)
    # A KeyboardInterrupt is a second Ctrl-C or SIGTERM (StopRequest), or one before it.
    stopped = (f"stopped at once; {Path(cfg.output_dir) / 'last.pt'} holds the last saved "
               "state, if any: continue with --resume")
    try:
        return run_command(run, cfg, given, on_interrupt=lambda: stopped)
    finally:
        distributed.shutdown()


def main_from_script(script_globals, argv=None):
    """main() with the settings block a dataset script defines at its top (names of
    settings.Settings; a misspelt one stops with the closest valid name)."""
    doc = (script_globals.get("__doc__") or "").strip()
    return run_command(lambda: main(settings.from_script(script_globals), argv,
                                    description=doc.split("\n")[0] or None))


if __name__ == "__main__":
    sys.exit(main())
