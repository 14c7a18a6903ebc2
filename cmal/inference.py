"""What the command-line tools on a trained model share (cmal.tools.predict, cmal.tools.attention).

Loading a checkpoint and images for inference, and the "combined" scoring of a batch exactly as
evaluation computes it (engine.evaluate, spec section 5): the raw pass, the three experts'
attention maps, a second pass on the joint attention crop, and the eight logits summed.
"""
import argparse
import os
import sys
from pathlib import Path

import torch

from cmal import checkpoint as ckpt_io
from cmal.data import build_transforms
from cmal.images import BadImageError, allow_images_up_to, is_image_file, load_rgb
from cmal.errors import UserError
from cmal import methods
from cmal.precision import Precision
from cmal.settings import Settings, parse_bool


class ToolError(UserError):
    """A failure the user can fix; the message is one line naming the file and what to do."""


def tool_parser(description):
    """The arguments every tool on a trained model takes: checkpoint, images, device, skipping."""
    p = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="last.pt or best.pt of a training run")
    p.add_argument("images", help="an image file, or a folder searched recursively for images")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda when "
                                                    "available)")
    p.add_argument("--skip_bad_images", type=parse_bool, nargs="?", const=True, default=False,
                   help="skip unreadable images with a warning instead of stopping")
    p.add_argument("--overwrite", type=parse_bool, nargs="?", const=True, default=False,
                   help="replace output files that already exist (never the checkpoint or an "
                        "input image)")
    p.add_argument("--max_image_pixels", type=_positive, default=None,
                   help="refuse images with more pixels (decompression bombs); by default the "
                        "limit the checkpoint was trained with")
    return p


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def check_output(path, inputs, overwrite, option):
    """Refuse to write `path` over one of the tool's `inputs` (always) or over any existing file
    (unless `overwrite`); `option` names the setting at fault."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir():  # --overwrite would not help: a folder is not replaced by a file
        raise ToolError(f"{path} (from {option}) is a folder, which the file this command "
                        f"writes cannot replace, even with --overwrite; choose another {option}")
    for source in inputs:
        if Path(source).exists() and os.path.samefile(path, source):
            raise ToolError(f"{path} (from {option}) is {source}, one of this command's "
                            f"inputs; choose another {option}")
    if not overwrite:
        raise ToolError(f"{path} (from {option}) already exists; choose another {option}, or "
                        "pass --overwrite to replace it")


def load_trained(path, device="cpu"):
    """(model in eval mode, class names, settings) of a checkpoint written by a training run:
    the network its settings describe, with its weights."""
    ck = ckpt_io.load(path)
    return model_of(ck, path, device), ck["classes"], settings_of(ck)


def model_of(ck, path, device="cpu", precision=None):
    """The trained network of a loaded checkpoint `ck` (read from `path`), in eval mode, built
    for `precision` (by default the checkpoint's --amp on `device`)."""
    cfg = settings_of(ck)
    precision = precision or Precision(cfg.amp, device)
    model = methods.method_of(cfg).build(cfg, precision)
    ckpt_io.load_model_state(model, ck, path)
    return model.eval()


def settings_of(ck):
    return Settings.from_checkpoint(ck["settings"])


def load_model(path, device, max_image_pixels=None):
    """(model in eval mode, class names, settings) of a training checkpoint; `max_image_pixels`
    replaces the limit on image size it was trained with."""
    try:
        model, classes, cfg = load_trained(path, device)
        cfg.max_image_pixels = max_image_pixels or cfg.max_image_pixels
        allow_images_up_to(cfg.max_image_pixels)
        return model, classes, cfg
    except ckpt_io.CheckpointError as exc:
        raise ckpt_io.CheckpointError(f"cannot use checkpoint {path}: {exc}") from None


def find_images(target):
    """The image files to process: `target` itself, or the image files below a folder (searched
    recursively, hidden entries skipped, sorted)."""
    target = Path(target)
    if not target.exists():
        raise ToolError(f"{target} does not exist; pass an image file or a folder of images")
    if target.is_file():
        return [target]
    if not target.is_dir():
        raise ToolError(f"{target} is not a regular file (a FIFO, device or socket) nor a "
                        "folder; pass an image file or a folder of images")
    found = sorted(p for p in target.rglob("*")
                   if p.is_file() and is_image_file(p.name)
                   and not any(part.startswith(".") for part in p.relative_to(target).parts))
    if not found:
        raise ToolError(f"no image files under {target} (searched recursively for "
                        "extensions like .jpg, .png); pass an image file or another folder")
    return found


def test_transform(cfg):
    """The evaluation preprocessing of a run's settings: resize, centre crop, normalise."""
    return build_transforms(cfg.image_size, cfg.resize, cfg.crop_padding)[1]


def load_images(paths, cfg, skip_bad=False):
    """(batch tensor, the paths it holds): each image decoded and preprocessed as at test time.

    An unreadable file raises BadImageError naming it, or with `skip_bad` is reported on stderr
    and left out (the batch may then be empty: None).
    """
    transform = test_transform(cfg)
    tensors, kept = [], []
    for path in paths:
        try:
            img = load_rgb(path, cfg.max_image_pixels)
        except BadImageError as exc:
            if not skip_bad:
                raise BadImageError(f"{exc}; remove or replace the file, or pass "
                                    "--skip_bad_images") from None
            print(f"warning: skipping {exc}", file=sys.stderr)
            continue
        tensors.append(transform(img))
        kept.append(path)
    return (torch.stack(tensors) if tensors else None), kept


def batches(items, size):
    for i in range(0, len(items), size):
        yield items[i:i + size]


# Above this many classes a confusion matrix picture is unreadable; the CSV holds it all.
CONFUSION_PICTURE_LIMIT = 60


def per_class_rows(classes, confusion):
    """(class, images, correct, accuracy %) from a confusion matrix (rows: true classes)."""
    rows = []
    for i, name in enumerate(classes):
        images, correct = sum(confusion[i]), confusion[i][i]
        rows.append((name, images, correct, 100.0 * correct / images if images else None))
    return rows


def mean_class_accuracy(rows):
    accuracies = [acc for *_, acc in rows if acc is not None]
    return sum(accuracies) / max(len(accuracies), 1)


def write_evaluation_report(folder, classes, confusion, rows):
    """per_class.csv (`rows` of per_class_rows), confusion.csv and (for up to
    CONFUSION_PICTURE_LIMIT classes) confusion.png; returns the files written."""
    import csv
    import io
    from cmal.files import write_text
    folder = Path(folder)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(["class", "images", "correct", "accuracy"])
    writer.writerows((n, i, c, "" if a is None else f"{a:.4f}") for n, i, c, a in rows)
    write_text(folder / "per_class.csv", table.getvalue())
    matrix = io.StringIO()
    writer = csv.writer(matrix, lineterminator="\n")
    writer.writerow(["true \\ predicted", *classes])
    writer.writerows([name, *counts] for name, counts in zip(classes, confusion))
    write_text(folder / "confusion.csv", matrix.getvalue())
    written = [folder / "per_class.csv", folder / "confusion.csv"]
    if len(classes) <= CONFUSION_PICTURE_LIMIT:
        written.append(_confusion_picture(folder / "confusion.png", classes, confusion))
    return written


def _confusion_picture(path, classes, confusion):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    counts = torch.tensor(confusion, dtype=torch.float64)
    share = counts / counts.sum(1, keepdim=True).clamp(min=1)  # each true class sums to 1
    size = max(4.0, 0.25 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted (combined score)")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
