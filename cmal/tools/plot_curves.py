"""Plot the learning curves of a training run from its log.jsonl.

    python -m cmal.tools.plot_curves RUN_DIR_OR_LOG [--out curves.png]

Left panel: training accuracy and the three test accuracies (concat head alone, com2 = the four
raw-pass heads, combined = those plus the four heads on the joint attention crop: the headline
number) against the epoch. Right panel: the training losses (train_loss, the reference's sum
loss1 + loss2 + loss3 + loss_concat, and the five losses of an iteration's passes) and the test
loss (cross entropy of the concat head). Test values exist only on evaluated epochs and are drawn
as points; a run with --val_split shows its validation values instead. Epochs are counted from 1,
as log.jsonl and the console count them (the reference-format logs' "Iteration" is 0-based).
"""
import argparse
import json
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

from cmal.checkpoint import RUN_FILES
from cmal.run_logs import JSON_LOG as LOG_NAME
from cmal.errors import run_command
from cmal.inference import ToolError, check_output
from cmal.settings import parse_bool

TRAIN_LOSSES = ("train_loss", "loss1", "loss2", "loss3", "loss_att", "loss_concat")
EVALUATED_ACCURACIES = (("acc_concat", "concat"), ("acc_com2", "com2"),
                        ("acc_combined", "combined"))


def parse_args(argv):
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description="Draw train and test accuracy (concat, com2, combined) and the training and "
                    "test losses of a run against the epoch, from its log.jsonl.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="a run's output_dir (holding log.jsonl) or the log.jsonl itself")
    p.add_argument("--out", default="curves.png", help="PNG file to write")
    p.add_argument("--overwrite", type=parse_bool, nargs="?", const=True, default=False,
                   help="replace --out if it exists (never the run's own files)")
    return p.parse_args(argv)


def read_log(target):
    """The epoch records of a run folder or log file, in epoch order."""
    target = Path(target)
    path = target / LOG_NAME if target.is_dir() else target
    if not path.is_file():
        where = f"{target} holds no {LOG_NAME}" if target.is_dir() else f"{target} does not exist"
        raise ToolError(f"{where}; pass the output_dir of a training run or its {LOG_NAME} "
                        "(a run writes it at the end of its first epoch)")
    records = []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ToolError(f"cannot read {path} ({exc}); pass a run's {LOG_NAME}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ToolError(f"{path} line {number} is not JSON ({exc.msg}); pass a run's "
                            f"{LOG_NAME}, not another file") from None
        if not isinstance(record, dict) or "epoch" not in record:
            raise ToolError(f"{path} line {number} is not an epoch record (no 'epoch' key); pass "
                            f"a run's {LOG_NAME}")
        records.append(record)
    if not records:
        raise ToolError(f"{path} is empty: no epoch of the run has finished yet; plot it later")
    if any(r["epoch"] == 0 for r in records):  # written before log.jsonl counted from 1
        records = [{**r, "epoch": r["epoch"] + 1} for r in records]
    return path, sorted(records, key=lambda r: r["epoch"])


def _series(records, key, sub=None):
    xs, ys = [], []
    for r in records:
        source = r.get(sub) if sub else r
        if isinstance(source, dict) and isinstance(source.get(key), (int, float)):
            xs.append(r["epoch"])
            ys.append(source[key])
    return xs, ys


def draw(records, title):
    fig = Figure(figsize=(12, 4.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    acc, loss = fig.subplots(1, 2)
    style = dict(linewidth=1.5, markersize=4)
    acc.plot(*_series(records, "train_acc"), "-", marker=".", color="black", label="train",
             **style)
    # The split best.pt was chosen on: validation (--val_split), else test.
    split = "val" if any(isinstance(r.get("val"), dict) for r in records) else "test"
    scored = [r for r in records if isinstance(r.get(split), dict) and "acc_combined" in r[split]]
    best = max(scored, key=lambda r: r[split]["acc_combined"]) if scored else None
    # Distinct markers, largest first: equal accuracies (common) stay visible.
    for (key, label), color, marker, size in zip(EVALUATED_ACCURACIES,
                                                 ("tab:blue", "tab:orange", "tab:red"), "os^",
                                                 (8, 6, 4)):
        label = f"{split} {label}"
        if key == "acc_combined" and best:
            label += f" (best {best[split]['acc_combined']:.2f}% at epoch {best['epoch']})"
        acc.plot(*_series(records, key, split), "--", marker=marker, color=color, label=label,
                 linewidth=1.5, markersize=size)
    acc.set_ylabel("accuracy (%)")
    acc.set_title("accuracy")

    positive = True
    for key, color in zip(TRAIN_LOSSES, ("black", "tab:purple", "tab:green", "tab:olive",
                                         "tab:cyan", "tab:brown")):
        xs, ys = _series(records, key)
        if ys and not any(ys):  # a pass the run does not make (the baseline's, an ablation's)
            continue
        positive &= all(y > 0 for y in ys)
        loss.plot(xs, ys, "-", marker=".", color=color,
                  label="train_loss (1+2+3+concat)" if key == "train_loss" else key,
                  linewidth=2.0 if key == "train_loss" else 1.2, markersize=4)
    xs, ys = _series(records, "loss", split)
    positive &= all(y > 0 for y in ys)
    loss.plot(xs, ys, "--o", color="tab:red", label=f"{split} loss (concat CE)", **style)
    if positive:
        loss.set_yscale("log")
        # Plain numbers (0.3, 2, 10) rather than powers of ten, at 1, 2, 3 and 5 per decade.
        plain = FuncFormatter(lambda y, _: f"{y:.3g}")
        loss.yaxis.set_major_formatter(plain)
        loss.yaxis.set_minor_locator(LogLocator(subs=(2.0, 3.0, 5.0)))
        loss.yaxis.set_minor_formatter(plain)
    loss.set_ylabel("loss" + (" (log scale)" if positive else ""))
    loss.set_title("losses")

    for ax in (acc, loss):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title, fontsize=10)
    return fig


def run(args):
    path, records = read_log(args.run)
    title = f"{path.parent} - {len(records)} epochs"
    out = Path(args.out)
    check_output(out, [path, *(path.parent / name for name in RUN_FILES)], args.overwrite,
                 "--out")
    fig = draw(records, title)
    try:
        if out.parent != Path(""):
            out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out)
    except (OSError, ValueError) as exc:
        raise ToolError(f"cannot write --out={out} ({getattr(exc, 'strerror', None) or exc}); "
                        "choose another path (a .png file)") from None
    print(out)
    return 0


def main(argv=None):
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
