"""Does CMAL-Net help? CMAL-Net against the plain fine-tuning baseline and its ablations, on the
demo dataset.

    python -m cmal.tools.demo --compare [--seeds=0,1,2] [--methods=cmal,baseline,no_crops]
                                        [--compare_dir=Results_demo_compare] [--resume]
                                        [any train.py setting, e.g. --epochs=8 --threads=2]

Trains each method with each seed, one after the other, at the demo's settings and equal epochs
(every other setting on the command line applies to every run), each in its own folder
COMPARE_DIR/<method>_seed<k>, through train.py's engine; then prints a markdown table (also
written to COMPARE_DIR/comparison.md, one row per run in COMPARE_DIR/runs.csv): for each method
the mean and sample standard deviation over the seeds of its best and final test accuracy, the
final accuracy of the concat head (the baseline: its one head), and its training time per epoch,
evaluation time per epoch and total. The accuracy is the "combined" score for CMAL-Net and its
ablations (evaluated with the same protocol), the one head's for the baseline.

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
from cmal.checkpoint import JSON_LOG, evaluated, write_text

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


def parse(argv, defaults):
    """(comparison options, the train.py options forwarded to every run)."""
    p = argparse.ArgumentParser(
        prog="python -m cmal.tools.demo --compare", allow_abbrev=False,
        description=" ".join(__doc__.split("\n\n")[0].split()),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Every other option is a train.py setting passed to every run (python -m "
               "cmal.tools.demo --help lists them).")
    p.add_argument("--seeds", type=_int_list, default="0,1,2", help="the seeds of each method")
    p.add_argument("--methods", type=_method_list, default="cmal,baseline,no_crops",
                   help=f"the methods compared, among {', '.join(VARIANTS)}")
    p.add_argument("--compare_dir", default="Results_demo_compare",
                   help="folder of the runs' folders and the table")
    args, rest = p.parse_known_args(argv)
    decided = sorted(settings.given_on_command_line(rest) & set(DECIDED))
    if decided:
        p.error(f"the comparison sets {', '.join('--' + n for n in decided)} for each run itself: "
                "choose --seeds, --methods and --compare_dir instead")
    settings.parse(defaults, rest, p.description)  # the forwarded options, before any work
    return args, rest


def run_args(rest, variant, seed, folder):
    method, ablation = VARIANTS[variant]
    return [*rest, f"--method={method}", f"--ablation={ablation}", f"--seed={seed}",
            f"--output_dir={folder}"]


def read_run(folder):
    """The figures of one finished run, from its log.jsonl (epochs counted from 1). With
    --val_split the accuracies are those of the validation split best.pt was chosen on."""
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
                 "train s/epoch", "test s/epoch", "total s")


def table(results):
    """The markdown table of {variant: [figures of each seed's run]}."""
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(TABLE_COLUMNS) - 1)) + "|"]
    for variant, runs in results.items():
        epochs = "/".join(sorted({str(r["epochs"]) for r in runs}))
        cells = [LABELS[variant], str(len(runs)), epochs,
                 _spread([r["best_acc"] for r in runs]), _spread([r["final_acc"] for r in runs]),
                 _spread([r["final_concat"] for r in runs]),
                 _spread([r["train_s_per_epoch"] for r in runs], 1),
                 _spread([r["test_s_per_epoch"] for r in runs], 1),
                 _spread([r["total_s"] for r in runs], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


LEGEND = ("acc: the combined score (the four heads of the raw pass and of the joint-crop pass "
          "summed) for CMAL-Net and its ablations, the one head for the baseline; best over the "
          "evaluated epochs, final at the last epoch, on the test split (with --val_split: on the "
          "validation split, each run's once-scored test being final_test in its last.pt); "
          "mean ± sample standard deviation over the seeds. Times: wall-clock seconds of training and of evaluation per epoch, and their "
          "sum over the run (start-up excluded).")


def runs_csv(rows):
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def main(argv, defaults, prepare_data):
    """The comparison; `defaults`: the demo's settings; `prepare_data(cfg)`: makes its data."""
    args, rest = parse(argv, defaults)
    resume = "resume" in settings.given_on_command_line(rest)
    prepare_data(settings.parse(defaults, rest))
    root = Path(args.compare_dir)
    runs = [(v, s) for v in args.methods for s in args.seeds]
    for i, (variant, seed) in enumerate(runs, start=1):
        folder = root / f"{variant}_seed{seed}"
        print(f"=== {LABELS[variant]}, seed {seed} ({i}/{len(runs)}): {folder}", flush=True)
        status = train.main(defaults, run_args(rest, variant, seed, folder))
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
        figures = read_run(root / f"{variant}_seed{seed}")
        results.setdefault(variant, []).append(figures)
        rows.append({"method": variant, "seed": seed, **figures})
    text = table(results)
    print("\n" + text + "\n" + LEGEND)
    write_text(root / "comparison.md", text + "\n" + LEGEND + "\n")
    write_text(root / "runs.csv", runs_csv(rows))
    print(f"\ntable in {root / 'comparison.md'}, one row per run in {root / 'runs.csv'}")
    return 0
