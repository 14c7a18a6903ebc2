"""The per-epoch logs of a run, rewritten from the history its checkpoint holds (so after a
resume each epoch appears in them exactly once): results_train.txt and results_test.txt in the
reference's formats, log.jsonl, summary.csv, and the TensorBoard scalars.
"""
import json
from pathlib import Path

from cmal.files import write_text
from cmal.tensorboard import tensorboard_writer_class

TRAIN_LOG = "results_train.txt"
TEST_LOG = "results_test.txt"
JSON_LOG = "log.jsonl"
SUMMARY = "summary.csv"
TENSORBOARD_DIR = "tensorboard"


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


def final_test_step(state):
    """The TensorBoard step of a run's final test: best.pt's epoch, or the last one's where
    no epoch scored above 0 % on validation."""
    return state.best_epoch + 1 if state.best_epoch is not None else state.epoch


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
