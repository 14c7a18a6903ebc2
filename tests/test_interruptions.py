"""Interrupted runs lose nothing: SIGKILL at any moment, SIGINT and SIGTERM.

Each case resumes with --resume and must end with the weights and every record (the logs, the
checkpoint's history, TensorBoard's scalars) of an uninterrupted run with the same seed."""
import importlib.util
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cmal import checkpoint as ckpt_io
from tests.conftest import TINY_ARGS, make_image_folder
from tests.run_records import assert_same_records

pytestmark = pytest.mark.slow  # make test-fast leaves these out

KILLER = Path(__file__).parent / "killer.py"
RUN_ARGS = ["--num_classes=3", "--epochs=3", "--eval_every=1", "--save_every=2"] + TINY_ARGS + (
    ["--tensorboard"] if importlib.util.find_spec("tensorboard") else [])
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _args(data, out):
    return [f"--data_path={data}", f"--output_dir={out}"] + RUN_ARGS


def launch(data, out, kind="none", n=0, *extra, wait=True):
    cmd = [sys.executable, str(KILLER), kind, str(n)] + _args(data, out) + list(extra)
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=ENV, start_new_session=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    data = make_image_folder(root / "data")
    out = root / "reference"
    proc = launch(data, out)
    assert proc.returncode == 0, proc.stderr
    return data, out


def _logged_epochs(path, pattern):
    if not path.exists():
        return []
    return [int(re.match(pattern, line).group(1)) for line in path.read_text().splitlines()]


def check_disk(out):
    """Whatever moment the process died at, what is on disk is whole and consistent."""
    for name in ("last.pt", "best.pt"):
        if (out / name).exists():
            ck = ckpt_io.load(out / name)
            assert len(ck["model"]) > 0 and ck["optimizer"]["state"] is not None
    train_epochs = _logged_epochs(out / "results_train.txt", r"Iteration (\d+) \|")
    assert train_epochs == list(range(len(train_epochs)))
    test_epochs = _logged_epochs(out / "results_test.txt", r"Iteration (\d+),")
    assert test_epochs == list(range(len(test_epochs)))


def assert_same_run(out, reference_out):
    a, b = ckpt_io.load(out / "last.pt"), ckpt_io.load(reference_out / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert_same_records(out, reference_out)
    best_a, best_b = ckpt_io.load(out / "best.pt"), ckpt_io.load(reference_out / "best.pt")
    assert best_a["best_epoch"] == best_b["best_epoch"]
    for k in best_b["model"]:
        assert torch.equal(best_a["model"][k], best_b["model"][k]), k
    assert not list(out.glob(".*.tmp"))


def test_twenty_sigkills_in_a_row(reference, tmp_path):
    data, reference_out = reference
    out = tmp_path / "killed"
    rng = random.Random(0)
    kills, kinds = 0, []
    while kills < 24:
        kind = ["write", "step", "eval", "time"][kills % 4]
        if kind == "time":  # a moment chosen by the clock, from outside
            proc = launch(data, out, "none", 0, "--resume", wait=False)
            time.sleep(rng.uniform(1.0, 4.0))
            proc.kill()
            proc.communicate()
            returncode = proc.returncode
        else:
            n = rng.randint(1, {"write": 3, "step": 5, "eval": 3}[kind])
            proc = launch(data, out, kind, n, "--resume")
            returncode = proc.returncode
        if returncode == 0:  # finished before the kill: start over to keep killing
            assert_same_run(out, reference_out)
            shutil.rmtree(out)
            continue
        assert returncode == -signal.SIGKILL, (returncode, kind, proc.stderr)
        kills += 1
        kinds.append(kind)
        check_disk(out)
    proc = launch(data, out, "none", 0, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(out, reference_out)
    assert kills >= 20 and set(kinds) == {"write", "step", "eval", "time"}


def test_sigterm_stops_after_a_resumable_checkpoint(reference, tmp_path):
    data, reference_out = reference
    out = tmp_path / "term"
    proc = launch(data, out, "sigterm", 3)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "stopped by SIGTERM at epoch 1, batch 3" in proc.stdout
    ck = ckpt_io.load(out / "last.pt")
    assert ck["epoch"] == 0 and ck["stats"]["position"] == 3
    proc = launch(data, out, "none", 0, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(out, reference_out)


def test_ctrl_c_to_the_process_group_with_workers(reference, tmp_path):
    data, reference_out = reference
    out = tmp_path / "int"
    proc = launch(data, out, "none", 0, "--workers=2", "--save_every=1", wait=False)
    deadline = time.time() + 120
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: workers get it too
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, stderr
    assert "SIGINT received" in stdout and "continue with --resume" in stdout
    check_disk(out)
    proc = launch(data, out, "none", 0, "--resume", "--workers=2")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(out, reference_out)


def test_sigterm_during_evaluation_keeps_the_epoch(reference, tmp_path):
    data, reference_out = reference
    out = tmp_path / "evalterm"
    proc = launch(data, out, "evalterm", 2)  # inside the first evaluation
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    ck = ckpt_io.load(out / "last.pt")
    assert ck["epoch"] == 0 and ck["stats"]["position"] == 6  # the whole epoch's training
    assert not (out / "results_test.txt").read_text()
    proc = launch(data, out, "none", 0, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(out, reference_out)


# Writes of a process that starts afresh: settings.json and the four logs (5), then per epoch
# last.pt at batches 2, 4 and 6 (--save_every=2), the epoch's checkpoint and its four logs: 17
# is epoch 2's checkpoint, 18 the first log after it. Evaluation batches: 3 per epoch.
@pytest.mark.parametrize("kind, n, epoch, position", [
    ("step", 9, 1, 2),      # inside epoch 2
    ("write", 17, 1, 6),    # in the write of epoch 2's checkpoint
    ("write", 18, 2, None),  # at the end of epoch 2: its checkpoint written, not its logs
    ("eval", 5, 1, 6),      # during epoch 2's evaluation
    ("evalterm", 8, 2, 6),  # SIGTERM during epoch 3's evaluation
])
def test_a_run_stopped_anywhere_records_what_an_uninterrupted_one_does(reference, tmp_path, kind,
                                                                      n, epoch, position):
    data, reference_out = reference
    out = tmp_path / kind
    proc = launch(data, out, kind, n)
    assert proc.returncode == (128 + signal.SIGTERM if kind == "evalterm" else -signal.SIGKILL)
    ck = ckpt_io.load(out / "last.pt")
    assert ck["epoch"] == epoch and (ck["stats"] and ck["stats"]["position"]) == position
    check_disk(out)
    proc = launch(data, out, "none", 0, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert_same_run(out, reference_out)
