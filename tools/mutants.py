"""Mutation check: put small deliberate bugs into cmal/, one at a time, and see whether the
tests that concern what a run reports and selects, and the data path, notice.

    python tools/mutants.py                      # every mutant, in this checkout
    python tools/mutants.py --root=/tmp/base     # in another checkout (e.g. an older commit)
    python tools/mutants.py --only=top5_on_concat,no_train_flip --json=out.json

Each mutant is an exact string replacement in one production file; the script stops at once if
the string is not found exactly once (the code moved: update the mutant). After each run the file
is restored from git, so the production files must have no uncommitted changes. A mutant is
"caught" when the selection fails (pytest exit status 1), "survived" when it passes; any other
outcome (an interrupted or broken run, a timeout) is reported as such. The unmutated selection
runs first and must pass, or no result would mean anything.

Run it with the project's Python and PYTHONPATH unset or pointing at --root; it sets PYTHONPATH
for the tests itself. One mutant takes from seconds (caught early) to a few minutes (survived:
the whole selection runs).
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# The tests run per mutant: the files about records, reports, selection, evaluation and data.
# The new file goes first, so that a mutant it catches stops the run (-x) in seconds.
SELECTION = (
    "tests/test_reports.py",
    "tests/test_records.py",
    "tests/test_data.py",
    "tests/test_engine.py",
    "tests/test_training_run.py",
    "tests/test_methods.py",
    "tests/test_tools.py",
    "tests/test_settings.py",
    "tests/test_reliability.py::test_run_folder_holds_its_settings_and_a_summary",
)

# (name, file, exact text, replacement). The first group are the kinds of bug that issue #18
# found surviving; "control" marks mutants the suite was expected to catch already.
MUTANTS = (
    # -- what a run reports ------------------------------------------------------------------
    ("train_loss_without_loss3", "cmal/engine.py",
     '"train_loss": (totals["loss1"] + totals["loss2"] + totals["loss3"]',
     '"train_loss": (totals["loss1"] + totals["loss2"]'),
    ("train_acc_per_batch", "cmal/engine.py",
     '100.0 * totals["correct"] / max(totals["total"], 1)',
     '100.0 * totals["correct"] / max(totals["batches"], 1)'),
    ("losses_per_sample", "cmal/engine.py",
     'n = max(totals["batches"], 1)', 'n = max(totals["total"], 1)'),
    ("log_lr_from_backbone_group", "cmal/train.py",
     '"lr": self.optimizer.param_groups[0]["lr"]', '"lr": self.optimizer.param_groups[-1]["lr"]'),
    ("log_backbone_lr_from_head_group", "cmal/train.py",
     '"backbone_lr": self.optimizer.param_groups[-1]["lr"]',
     '"backbone_lr": self.optimizer.param_groups[0]["lr"]'),
    ("summary_concat_from_com2", "cmal/run_logs.py",
     'for k in ("loss", "acc_concat",', 'for k in ("loss", "acc_com2",'),
    ("summary_loss_and_acc_swapped", "cmal/run_logs.py",
     "f\"{r['train_loss']:.6f}\", f\"{r['train_acc']:.4f}\"",
     "f\"{r['train_acc']:.6f}\", f\"{r['train_loss']:.4f}\""),
    ("summary_backbone_lr_from_lr", "cmal/run_logs.py",
     "f\"{r['backbone_lr']:.6g}\"", "f\"{r['lr']:.6g}\""),
    ("results_train_loss1_loss2_swapped", "cmal/run_logs.py",
     'r["loss1"], r["loss2"], r["loss3"]', 'r["loss2"], r["loss1"], r["loss3"]'),
    ("results_test_from_com2", "cmal/run_logs.py",
     'epoch, test["acc_combined"], test["loss"])', 'epoch, test["acc_com2"], test["loss"])'),
    ("results_test_epoch_from_1 (control)", "cmal/run_logs.py",
     '"".join(test_line(e, t) for e, t in tests)', '"".join(test_line(e + 1, t) for e, t in tests)'),
    ("log_jsonl_epoch_from_0 (control)", "cmal/run_logs.py",
     '{**r, "epoch": r["epoch"] + 1}', '{**r, "epoch": r["epoch"]}'),
    ("console_combined_from_com2", "cmal/methods.py",
     "f\"{t['acc_combined']:6.2f}%{best_text}\"", "f\"{t['acc_com2']:6.2f}%{best_text}\""),
    # -- what a run selects, and evaluation ----------------------------------------------------
    ("best_on_concat", "cmal/train.py",
     'is_best = scored is not None and scored["acc_combined"] > state.best_acc',
     'is_best = scored is not None and scored["acc_concat"] > state.best_acc'),
    ("best_on_ties_takes_the_later", "cmal/train.py",
     'scored["acc_combined"] > state.best_acc', 'scored["acc_combined"] >= state.best_acc'),
    ("top5_on_concat", "cmal/engine.py", "best5 = com.topk(", "best5 = concat.topk("),
    ("top5_is_top3", "cmal/engine.py", "com.topk(min(5, num_classes)", "com.topk(min(3, num_classes)"),
    ("flip_mirror_alone", "cmal/engine.py",
     "flipped = ((com + mirrored).argmax(1) == targets)", "flipped = (mirrored.argmax(1) == targets)"),
    ("flip_vertical (control)", "cmal/engine.py", "inputs.flip(3)", "inputs.flip(2)"),
    ("confusion_transposed", "cmal/engine.py",
     "targets * num_classes + predicted", "predicted * num_classes + targets"),
    ("per_class_images_from_predictions", "cmal/inference.py",
     "images, correct = sum(confusion[i]), confusion[i][i]",
     "images, correct = sum(row[i] for row in confusion), confusion[i][i]"),
    ("eval_loss_on_combined (control)", "cmal/engine.py",
     "loss = criterion(concat, targets) * len(targets)", "loss = criterion(com, targets) * len(targets)"),
    # -- the data path -----------------------------------------------------------------------
    ("no_train_flip", "cmal/data.py", "T.RandomHorizontalFlip(),", "T.RandomHorizontalFlip(p=0.0),"),
    ("train_resize_keeps_aspect", "cmal/data.py",
     "T.Resize((resize, resize)),\n        T.RandomCrop(", "T.Resize(resize),\n        T.RandomCrop("),
    ("train_padding_halved", "cmal/data.py",
     "padding=crop_padding)", "padding=crop_padding // 2)"),
    ("test_crop_random", "cmal/data.py", "T.CenterCrop(image_size),", "T.RandomCrop(image_size),"),
    ("normalize_std", "cmal/data.py",
     "T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))", "T.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))"),
    ("sampler_order_ignores_seed", "cmal/data.py",
     "order = torch.randperm(self.num_samples, generator=g)",
     "order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.epoch))"),
    ("sample_seeds_ignore_run_seed", "cmal/data.py",
     "seeds = torch.randint(0, 2 ** 62, (self.num_samples,), generator=g)",
     "seeds = torch.randint(0, 2 ** 62, (self.num_samples,), "
     "generator=torch.Generator().manual_seed(self.epoch))"),
    ("augmentation_seeded_by_index", "cmal/data.py",
     "torch.default_generator.manual_seed(seed)", "torch.default_generator.manual_seed(index)"),
    ("sampler_ignores_epoch (control)", "cmal/data.py",
     "mix_seed(self.seed, self.epoch, 1)", "mix_seed(self.seed, 0, 1)"),
    ("last_partial_batch_kept", "cmal/data.py", "drop_last=True,", "drop_last=False,"),
    ("eval_drops_last_partial_batch", "cmal/data.py",
     "DataLoader(dataset, batch_size=cfg.test_batch_size,",
     "DataLoader(dataset, batch_size=cfg.test_batch_size, drop_last=True,"),
    ("holdout_count_truncated", "cmal/data.py",
     "max(1, round(fraction * len(indices)))", "max(1, int(fraction * len(indices)))"),
    ("holdout_may_be_empty", "cmal/data.py",
     "max(1, round(fraction * len(indices)))", "max(0, round(fraction * len(indices)))"),
    ("holdout_takes_whole_class (control)", "cmal/data.py",
     "len(indices) - 1)", "len(indices))"),
    ("crop_flags_ignore_epoch", "cmal/train.py",
     "torch.manual_seed(mix_seed(cfg.seed, epoch, 2))", "torch.manual_seed(mix_seed(cfg.seed, 0, 2))"),
    ("crop_flags_ignore_seed", "cmal/train.py",
     "torch.manual_seed(mix_seed(cfg.seed, epoch, 2))", "torch.manual_seed(mix_seed(0, epoch, 2))"),
    # -- the reference's defaults --------------------------------------------------------------
    ("default_batch_32", "cmal/settings.py",
     "batch_size: int = _setting(16,", "batch_size: int = _setting(32,"),
    ("default_padding_0", "cmal/settings.py",
     "crop_padding: int = _setting(8,", "crop_padding: int = _setting(0,"),
    ("eval_schedule_from_4 (control)", "cmal/train.py", "return epoch < 5 or",
     "return epoch < 4 or"),
)


def apply(root, file, old, new):
    path = Path(root) / file
    text = path.read_text()
    found = text.count(old)
    if found != 1:
        raise SystemExit(f"{path}: the mutant's text occurs {found} times, not once: {old!r}; "
                         "update the mutant in tools/mutants.py")
    path.write_text(text.replace(old, new))


def restore(root, file):
    subprocess.run(["git", "-C", str(root), "checkout", "--", file], check=True)


def run_tests(root, tests, timeout):
    """pytest's exit status on the selection ('timeout' when it ran past `timeout` seconds)."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider",
           *tests]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", ""
    lines = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
    return proc.returncode, (lines[0][7:] if lines else proc.stdout.strip().splitlines()[-1:])


def fate(status):
    return {0: "survived", 1: "caught"}.get(status, f"error ({status})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]),
                   help="the git checkout to mutate and test")
    p.add_argument("--only", default="", help="comma-separated mutant names (default: all)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per mutant")
    p.add_argument("--json", default="", help="write the results to this file")
    p.add_argument("--tests", default="",
                   help="comma-separated test paths instead of the fixed selection (a quick look)")
    p.add_argument("--check", action="store_true",
                   help="only check that every mutant's text occurs once; run nothing")
    args = p.parse_args(argv)
    # A SIGTERM would end the process without restoring the mutated file: exit through the
    # `finally` that restores it instead.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(args.root).resolve()
    chosen = [m for m in MUTANTS if not args.only or m[0] in args.only.split(",")]
    if args.only and len(chosen) != len(set(args.only.split(","))):
        raise SystemExit(f"--only names a mutant that does not exist: {args.only}")
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "cmal"],
                           capture_output=True, text=True, check=True).stdout
    if dirty:
        raise SystemExit(f"{root}/cmal has uncommitted changes, which restoring from git would "
                         f"lose; commit or stash them first:\n{dirty}")
    if args.check:
        for name, file, old, _ in chosen:
            found = (root / file).read_text().count(old)
            if found != 1:
                raise SystemExit(f"{name}: its text occurs {found} times in {file}, not once")
        print(f"{len(chosen)} mutants, each text found once")
        return 0
    selection = args.tests.split(",") if args.tests else SELECTION
    tests = [t for t in selection if (root / t.split("::")[0]).exists()]
    print(f"selection: {' '.join(tests)}", flush=True)
    status, _ = run_tests(root, tests, args.timeout)
    if status != 0:
        raise SystemExit(f"the selection fails without any mutant (status {status}): fix that first")
    results = []
    for name, file, old, new in chosen:
        t0 = time.time()
        apply(root, file, old, new)
        try:
            status, detail = run_tests(root, tests, args.timeout)
        finally:
            restore(root, file)
        results.append({"mutant": name, "file": file, "fate": fate(status), "by": detail,
                        "seconds": round(time.time() - t0)})
        print(f"{fate(status):9s} {name:40s} {time.time() - t0:5.0f}s  {detail}", flush=True)
    caught = sum(r["fate"] == "caught" for r in results)
    print(f"caught {caught} of {len(results)}; survived "
          f"{sum(r['fate'] == 'survived' for r in results)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"root": str(root), "tests": tests,
                                               "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
