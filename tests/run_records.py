"""What a run records, less what legitimately differs between two runs of the same computation:
the wall-clock times. Used to check that a stopped and resumed run records exactly what an
uninterrupted one records."""
import csv
import io
import json

from cmal import checkpoint as ckpt_io

# The only fields that may differ: how long things took. "time" of an epoch record (log.jsonl,
# the checkpoint's history) and of its evaluation ("test" / "val"), and summary.csv's column.
TIME_FIELDS = ("time",)
TIME_COLUMNS = ("time",)
EVALUATIONS = ("test", "val")


def _without_times(record):
    kept = {k: v for k, v in record.items() if k not in TIME_FIELDS}
    for split in EVALUATIONS:
        if isinstance(kept.get(split), dict):
            kept[split] = {k: v for k, v in kept[split].items() if k not in TIME_FIELDS}
    return kept


def _summary_without_times(text):
    rows = list(csv.reader(io.StringIO(text)))
    keep = [i for i, name in enumerate(rows[0]) if name not in TIME_COLUMNS]
    assert len(keep) == len(rows[0]) - len(TIME_COLUMNS), rows[0]
    return [[row[i] for i in keep] for row in rows]


def tensorboard_scalars(out):
    """{tag: [(step, value), ...]} of a run's TensorBoard events, or None without any."""
    folder = out / ckpt_io.TENSORBOARD_DIR
    if not folder.exists():
        return None
    from tensorboard.backend.event_processing import event_accumulator
    logs = event_accumulator.EventAccumulator(str(folder), size_guidance={"scalars": 0})
    logs.Reload()
    return {tag: [(e.step, e.value) for e in logs.Scalars(tag)]
            for tag in sorted(logs.Tags()["scalars"])}


def comparable_records(out):
    """Every record a finished run in `out` holds, with the wall-clock times left out."""
    last = ckpt_io.load(out / "last.pt")
    return {
        ckpt_io.TRAIN_LOG: (out / ckpt_io.TRAIN_LOG).read_text(),
        ckpt_io.TEST_LOG: (out / ckpt_io.TEST_LOG).read_text(),
        ckpt_io.JSON_LOG: [_without_times(json.loads(line))
                           for line in (out / ckpt_io.JSON_LOG).read_text().splitlines()],
        ckpt_io.SUMMARY: _summary_without_times((out / ckpt_io.SUMMARY).read_text()),
        "history": [_without_times(r) for r in last["history"]],
        "best": (last["best_epoch"], last["best_acc"], last["final_test"]),
        "optimizer groups": last["optimizer"]["param_groups"],
        "tensorboard": tensorboard_scalars(out),
    }


def assert_same_records(out, reference_out):
    a, b = comparable_records(out), comparable_records(reference_out)
    assert a.keys() == b.keys()
    for name in b:
        assert a[name] == b[name], (name, a[name], b[name])
