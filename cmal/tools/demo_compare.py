"""Does CMAL-Net help? CMAL-Net against the plain fine-tuning baseline and its ablations, on the
demo dataset.

    python -m cmal.tools.demo --compare [--seeds=0,1,2] [--methods=cmal,baseline,no_crops]
                                        [--compare_dir=Results_demo_compare] [--resume]
                                        [any train.py setting, e.g. --epochs=8 --threads=2]

Trains each method with each seed, one after the other, at the demo's settings and equal epochs (or
equal optimizer steps, --equal_steps)
(every other setting on the command line applies to every run), each in its own folder
COMPARE_DIR/<method>_seed<k>, through train.py's engine; then prints a markdown table (also
written to COMPARE_DIR/comparison.md, one row per run in COMPARE_DIR/runs.csv): for each method
the mean and sample standard deviation over the seeds of its best and final test accuracy, the
final accuracy of the concat head (the baseline: its one head), and its training time per epoch,
evaluation time per epoch and total. The accuracy is the "combined" score for CMAL-Net and its
ablations (evaluated with the same protocol), the one head's for the baseline.

With --equal_steps, each method trains for as many optimizer steps as CMAL-Net does in --epochs:
CMAL-Net and no_crops make 5 optimizer steps per batch, no_joint_crop 4, the baseline 1 (STEPS),
so a method of k steps per batch trains round(epochs x 5 / k) epochs (its cosine schedule spans
them). Without it (the default demo's comparison) every method trains --epochs epochs.

Where the data has annotated part boxes (boxes.csv: the demo's marks), a second table gives the
attention localisation of each crop at the final epoch (cmal/localisation.py) against a random
box of the same size.

With --resume, a run whose folder already holds a checkpoint continues from it (a finished one
is only read back), so an interrupted comparison is continued rather than started over;
without it, every run starts afresh.
"""
import argparse
import csv
import io
import json
import statistics
import sys
from pathlib import Path

from cmal import settings
from cmal import train
from cmal.files import write_text
from cmal.run_logs import JSON_LOG, evaluated

# The methods the table can hold, and the settings of each.
VARIANTS = {
    "cmal": ("cmal", "none"),
    "baseline": ("baseline", "none"),
    "no_crops": ("cmal", "no_crops"),
    "no_joint_crop": ("cmal", "no_joint_crop"),
}
LABELS = {
    "cmal": "CMAL-Net",
    "baseline": "baseline (one head)",
    "no_crops": "CMAL-Net, no attention crops",
    "no_joint_crop": "CMAL-Net, no joint-crop step",
}
# Optimizer steps per batch of each method (engine.iteration_tensors; baseline.py: one).
STEPS = {"cmal": 5, "baseline": 1, "no_crops": 5, "no_joint_crop": 4}
# Settings the comparison decides for each run.
DECIDED = ("seed", "output_dir", "method", "ablation")


def _int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") \
            from None
    if not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct comma-separated integers, got "
                                         f"{text!r}")
    return values


def _method_list(text):
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in VARIANTS]
    if unknown or not values or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"expected distinct names among {', '.join(VARIANTS)}, got {text!r}")
    return values


def _flag(text):
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def parse(argv, defaults, compare_defaults=None):
    """(comparison options, the train.py options forwarded to every run). `compare_defaults`:
    the demo variant's defaults of --methods, --compare_dir and --equal_steps."""
    compare_defaults = compare_defaults or {}
    p = argparse.ArgumentParser(
        prog="python -m cmal.tools.demo --compare", allow_abbrev=False,
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Every other option is a train.py setting passed to every run (python -m "
               "cmal.tools.demo --help lists them).")
    p.add_argument("--seeds", type=_int_list, default="0,1,2", help="the seeds of each method")
    p.add_argument("--methods", type=_method_list,
                   default=compare_defaults.get("methods", "cmal,baseline,no_crops"),
                   help=f"the methods compared, among {', '.join(VARIANTS)}")
    p.add_argument("--compare_dir",
                   default=compare_defaults.get("compare_dir", "Results_demo_compare"),
                   help="folder of the runs' folders and the table")
    p.add_argument("--equal_steps", type=_flag, nargs="?", const=True,
                   default=compare_defaults.get("equal_steps", False),
                   help="train every method for CMAL-Net's number of optimizer steps in --epochs "
                        "(round(epochs x 5 / steps per batch) epochs) rather than equal epochs")
    args, rest = p.parse_known_args(argv)
    decided = sorted(settings.given_on_command_line(rest) & set(DECIDED))
    if decided:
        p.error(f"the comparison sets {', '.join('--' + n for n in decided)} for each run itself: "
                "choose --seeds, --methods and --compare_dir instead")
    settings.parse(defaults, rest, p.description)  # the forwarded options, before any work
    return args, rest


def run_args(rest, variant, seed, folder, epochs=None):
    """train.py's arguments of one run; `epochs`: its own number of epochs (--equal_steps)."""
    method, ablation = VARIANTS[variant]
    return [*rest, f"--method={method}", f"--ablation={ablation}", f"--seed={seed}",
            f"--output_dir={folder}"] + ([f"--epochs={epochs}"] if epochs else [])


def equal_step_epochs(variant, epochs):
    """The epochs in which `variant` makes as many optimizer steps as CMAL-Net in `epochs`,
    rounded half to even (no_joint_crop at 10 epochs: 12, 48 steps per batch against 50)."""
    return max(1, round(epochs * STEPS["cmal"] / STEPS[variant]))


def read_run(folder, variant=None):
    """The figures of one finished run of `variant` (a key of VARIANTS), from its log.jsonl
    (epochs counted from 1). With --val_split the accuracies are those of the validation split
    best.pt was chosen on. "localisation": the final epoch's (None without part boxes)."""
    path = Path(folder) / JSON_LOG
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    scored = [(r, evaluated(r)) for r in records if evaluated(r)]
    if not scored:
        raise ValueError(f"{path}: no evaluated epoch")
    final = evaluated(records[-1]) or scored[-1][1]
    best_record, best = max(scored, key=lambda pair: pair[1]["acc_combined"])
    return {
        "epochs": len(records),
        "best_acc": best["acc_combined"], "best_epoch": best_record["epoch"],
        "final_acc": final["acc_combined"], "final_concat": final["acc_concat"],
        "final_com2": final["acc_com2"],
        **{f"final_expert{i}": final.get(f"acc_expert{i}") for i in (1, 2, 3)},
        # An epoch's "time" holds its training and its evaluation, whose own time is the
        # evaluation's "time"; a resumed epoch counts from the resume.
        "steps_per_batch": STEPS[variant] if variant else None,
        "localisation": final.get("localisation"),
        "train_s_per_epoch": statistics.mean(
            r["time"] - (evaluated(r) or {}).get("time", 0.0) for r in records),
        "test_s_per_epoch": statistics.mean(s.get("time", 0.0) for _, s in scored),
        "total_s": sum(r["time"] for r in records),
    }


def _spread(values, digits=2):
    """mean ± sample standard deviation (the mean alone for one value)."""
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


TABLE_COLUMNS = ("method", "seeds", "epochs", "best acc %", "final acc %", "final concat head %",
                 "final experts 1/2/3 %", "steps/batch", "train s/epoch", "test s/epoch",
                 "total s")


def _header(columns):
    return ["| " + " | ".join(columns) + " |",
            "|" + "|".join(["---"] * 2 + ["---:"] * (len(columns) - 2)) + "|"]


def _experts(runs):
    """The mean final accuracy of each expert over the seeds, a/b/c (the baseline: none)."""
    if any(r.get("final_expert1") is None for r in runs):
        return "-"
    return "/".join(f"{statistics.mean(r[f'final_expert{i}'] for r in runs):.1f}"
                    for i in (1, 2, 3))


def table(results):
    """The markdown table of {variant: [figures of each seed's run]}."""
    lines = _header(TABLE_COLUMNS)
    for variant, runs in results.items():
        epochs = "/".join(sorted({str(r["epochs"]) for r in runs}))
        steps = "/".join(sorted({str(r.get("steps_per_batch") or "?") for r in runs}))
        cells = [LABELS[variant], str(len(runs)), epochs,
                 _spread([r["best_acc"] for r in runs]), _spread([r["final_acc"] for r in runs]),
                 _spread([r["final_concat"] for r in runs]), _experts(runs), steps,
                 _spread([r["train_s_per_epoch"] for r in runs], 1),
                 _spread([r["test_s_per_epoch"] for r in runs], 1),
                 _spread([r["total_s"] for r in runs], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


LOCALISATION_COLUMNS = ("method", "crop", "part centre in crop %", "IoU", "crop area",
                        "whole image %", "chance: centre in %", "chance: IoU")


def localisation_table(results):
    """The markdown table of the final epoch's localisation of each crop of each method with
    part boxes (mean ± sd over seeds), or None where no run has any."""
    from cmal.localisation import CROPS
    lines = _header(LOCALISATION_COLUMNS)
    for variant, runs in results.items():
        found = [r["localisation"] for r in runs if r.get("localisation")]
        if len(found) != len(runs) or not found:
            continue
        for crop in CROPS:
            own, chance = [f[crop] for f in found], [f["chance"][crop] for f in found]
            cells = [LABELS[variant], crop, _spread([o["pointing"] for o in own], 1),
                     _spread([o["iou"] for o in own], 3), _spread([o["area"] for o in own]),
                     _spread([o["whole"] for o in own], 1),
                     _spread([c["pointing"] for c in chance], 1),
                     _spread([c["iou"] for c in chance], 3)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else None


LOCALISATION_LEGEND = (
    "Localisation at the final epoch, on the test images, of the crop boxes training and "
    "evaluation use (theta 0.5, padding 0.1) against each image's annotated part box (boxes.csv): "
    "the percentage of images whose crop contains the part's centre, the mean IoU, the mean crop "
    "area as a fraction of the image, the percentage cropped to the whole image (an empty or "
    "degenerate map); chance: a box of the same height and width placed uniformly at random in "
    "the image (16 placements per image). no_crops computes the same boxes at evaluation but "
    "never trains on them. Mean ± sample standard deviation over the seeds.")


def _flat(figures):
    """A runs.csv row: the localisation record spread over loc_<crop>_<figure> columns."""
    from cmal.localisation import CHANCE_FIGURES, CROPS, FIGURES
    loc = figures.pop("localisation", None)
    for crop in CROPS:
        for k in FIGURES:
            figures[f"loc_{crop}_{k}"] = loc[crop][k] if loc else None
        for k in CHANCE_FIGURES:
            figures[f"loc_{crop}_chance_{k}"] = loc["chance"][crop][k] if loc else None
    return figures


LEGEND = ("acc: the combined score (the four heads of the raw pass and of the joint-crop pass "
          "summed) for CMAL-Net and its ablations, the one head for the baseline; best over the "
          "evaluated epochs, final at the last epoch, on the test split (with --val_split: on the "
          "validation split, each run's once-scored test being final_test in its last.pt); "
          "mean ± sample standard deviation over the seeds. Final experts: each expert's own "
          "accuracy (raw pass) at the last epoch, mean over the seeds. steps/batch: optimizer "
          "steps per batch. Times: wall-clock seconds of training and of evaluation per epoch, "
          "and their sum over the run (start-up excluded).")


def runs_csv(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def main(argv, defaults, prepare_data, compare_defaults=None):
    """The comparison; `defaults`: the demo's settings; `prepare_data(cfg)`: makes its data;
    `compare_defaults`: the demo variant's defaults of the comparison's own options."""
    args, rest = parse(argv, defaults, compare_defaults)
    resume = "resume" in settings.given_on_command_line(rest)
    cfg = settings.parse(defaults, rest)
    prepare_data(cfg)
    root = Path(args.compare_dir)
    runs = [(v, s) for v in args.methods for s in args.seeds]
    if args.equal_steps:
        print("equal optimizer steps: " + ", ".join(
            f"{LABELS[v]} {STEPS[v]} per batch x {equal_step_epochs(v, cfg.epochs)} epochs"
            for v in args.methods), flush=True)
    for i, (variant, seed) in enumerate(runs, start=1):
        folder = root / f"{variant}_seed{seed}"
        print(f"=== {LABELS[variant]}, seed {seed} ({i}/{len(runs)}): {folder}", flush=True)
        epochs = equal_step_epochs(variant, cfg.epochs) if args.equal_steps else None
        status = train.main(defaults, run_args(rest, variant, seed, folder, epochs))
        if status:
            hint = "see the message above"
            if status >= 128:  # stopped by a signal, its checkpoint saved
                hint = "run the same command" + ("" if resume else " with --resume") + \
                    " to continue it"
            print(f"the comparison stopped at {folder} (exit status {status}): {hint}",
                  file=sys.stderr)
            return status
    results, rows = {}, []
    for variant, seed in runs:
        figures = read_run(root / f"{variant}_seed{seed}", variant)
        results.setdefault(variant, []).append(figures)
        rows.append(_flat({"method": variant, "seed": seed, **figures}))
    report = table(results) + "\n" + LEGEND + "\n"
    located = localisation_table(results)
    if located:
        report += "\n" + located + "\n" + LOCALISATION_LEGEND + "\n"
    print("\n" + report, end="")
    write_text(root / "comparison.md", report)
    write_text(root / "runs.csv", runs_csv(rows))
    print(f"\ntable in {root / 'comparison.md'}, one row per run in {root / 'runs.csv'}")
    return 0
