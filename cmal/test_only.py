"""--test_only: a trained checkpoint scored on its dataset's test split, as timm's validate.py
scores one, with the network and the image sizes it was trained with, and its report (per-class
accuracy and the confusion matrix) written beside it. train.run calls it after the checks and
the data scan every run shares.
"""
from pathlib import Path

import torch.nn as nn

from cmal import checkpoint as ckpt_io
from cmal import distributed
from cmal import localisation, methods
from cmal import settings
from cmal.checkpoint import check_classes
from cmal.cuda_graph import GraphedScores
from cmal.distributed import log
from cmal.engine import evaluate
from cmal.errors import DiskFullError, WriteError, disk_full_cause
from cmal.inference import (mean_class_accuracy, model_of, per_class_rows,
                            write_evaluation_report)
from cmal.precision import Precision


def evaluated_path(cfg):
    """The checkpoint --test_only scores: --resume=PATH, else output_dir/best.pt."""
    if cfg.resume and cfg.resume != "auto":
        return Path(cfg.resume)
    path = Path(cfg.output_dir) / "best.pt"
    if not path.is_file():
        raise ckpt_io.not_a_file(path, alternative=" (--test_only evaluates --output_dir's "
                                                   "best.pt: pass --output_dir=RUN_FOLDER, or "
                                                   "--resume=CHECKPOINT)")
    return path


def test_only(cfg, device, ck, path, test_loader):
    """Score a checkpoint on cfg.data_path's test split, with the network, image size and resize
    it was trained with (cfg holds them already). Besides the paper's three accuracies, it
    reports top-5 and mean per-class accuracy, and writes a per-class table and the confusion
    matrix next to the checkpoint (CHECKPOINT-STEM_evaluation/)."""
    classes = ck["classes"]
    check_classes(ck, test_loader.dataset.classes, path)
    report = path.parent / f"{path.stem}_evaluation"
    if report.exists() and any(report.iterdir()) and not cfg.overwrite:
        raise ckpt_io.CheckpointError(f"{report} already holds an evaluation report: pass "
                                      "--overwrite to replace it, or move it away")
    # One precision for the network's ABN and the evaluation's autocast: this command's --amp.
    precision = Precision(cfg.amp, device)
    model = model_of(ck, path, device, precision)
    result = evaluate(model, test_loader, nn.CrossEntropyLoss(), device, precision,
                      cfg.channels_last,
                      progress=settings.show_progress(cfg) and distributed.is_main(),
                      num_classes=len(classes), flip=cfg.tta_flip,
                      scores=GraphedScores(precision)
                      if settings.use_cuda_graph(cfg, device) else None)
    log(f"{path}: {methods.method_of(cfg).test_only_text(result)}")
    if "localisation" in result:
        log(localisation.describe(result["localisation"]))
    rows = per_class_rows(classes, result["confusion"])
    kind = methods.method_of(cfg).headline
    log(f"beyond the paper's protocol: top-5 ({kind}) {result['acc_top5_combined']:.2f}%, "
        f"mean per-class ({kind}) {mean_class_accuracy(rows):.2f}%"
        + (f", combined with mirror images {result['acc_combined_flip']:.2f}%"
           if cfg.tta_flip else ""))
    if distributed.is_main():
        try:
            written = write_evaluation_report(report, classes, result["confusion"], rows)
        except (WriteError, OSError) as exc:
            raise report_not_written(exc, report, path) from None
        log(f"per-class accuracy and confusion matrix: {', '.join(str(p) for p in written)}")
    return 0


def report_not_written(exc, report, path):
    """--test_only could not write its report beside the checkpoint: the accuracies it printed
    stand; say where the report can be written instead."""
    full = isinstance(exc, DiskFullError) or disk_full_cause(exc) is not None
    reason = exc.problem if isinstance(exc, WriteError) else f"cannot write ({exc.strerror})"
    elsewhere = (f"link or copy {path} into a folder you can write to and evaluate that "
                 f"(--test_only --resume=FOLDER/{path.name}): the report is written beside the "
                 "checkpoint")
    return ckpt_io.CheckpointError(
        f"the accuracies above stand, but the evaluation report could not be written into "
        f"{report} ({reason}); " + (f"free space and evaluate again, or {elsewhere}" if full
                                    else elsewhere))
