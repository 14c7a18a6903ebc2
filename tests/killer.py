"""Run train.main in a process that interrupts itself at a chosen moment.

    python tests/killer.py KIND N [train.py arguments]

KIND: step (SIGKILL after this process's N-th training iteration), sigterm (SIGTERM after the
N-th iteration), write (SIGKILL halfway through writing the N-th checkpoint file), eval
(SIGKILL inside the N-th evaluation batch), evalterm (SIGTERM inside it), doubleint (two
SIGINTs to the process group after the N-th iteration, as a user pressing Ctrl-C twice), none.
"""
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmal import engine  # noqa: E402
from cmal import files  # noqa: E402
from cmal import scores  # noqa: E402
from cmal import train  # noqa: E402

kind, target = sys.argv[1], int(sys.argv[2])
count = 0


def tick(sig=signal.SIGKILL):
    global count
    count += 1
    if count == target:
        os.kill(os.getpid(), sig)


if kind in ("step", "sigterm"):
    original_step = engine.train_step

    def train_step(*args, **kwargs):
        result = original_step(*args, **kwargs)
        tick(signal.SIGTERM if kind == "sigterm" else signal.SIGKILL)
        return result
    engine.train_step = train_step
elif kind == "doubleint":
    original_step = engine.train_step

    def train_step(*args, **kwargs):
        global count
        result = original_step(*args, **kwargs)
        count += 1
        if count == target:
            os.killpg(os.getpgrp(), signal.SIGINT)
            os.killpg(os.getpgrp(), signal.SIGINT)
        return result
    engine.train_step = train_step
elif kind == "write":
    original_write = files._atomic_write

    def atomic_write(path, write):
        def half_then_die(f):
            if count + 1 == target:
                import io
                buf = io.BytesIO()
                write(buf)
                f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
            tick()
            write(f)
        original_write(path, half_then_die)
    files._atomic_write = atomic_write
elif kind in ("eval", "evalterm"):
    # Evaluation's joint crop is computed in cmal/scores.py (the network's evaluation_logits).
    original_evaluate, original_highlight = train.evaluate, scores.highlight_im
    inside = [False]

    def highlight_im(*args, **kwargs):
        if inside[0]:
            tick(signal.SIGTERM if kind == "evalterm" else signal.SIGKILL)
        return original_highlight(*args, **kwargs)

    def evaluate(*args, **kwargs):
        inside[0] = True
        try:
            return original_evaluate(*args, **kwargs)
        finally:
            inside[0] = False
    scores.highlight_im, train.evaluate = highlight_im, evaluate
elif kind != "none":
    raise SystemExit(f"unknown kind {kind}")

sys.exit(train.main(None, sys.argv[3:]))
