"""Two CPU processes through torchrun (DDP over Gloo): identical weights on both ranks, the same
evaluation as a single process, and resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cmal import checkpoint as ckpt_io
from cmal import train
from tests.conftest import TINY_ARGS, make_image_folder

pytestmark = pytest.mark.slow  # make test-fast leaves these out

TESTS = Path(__file__).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ARGS = ["--num_classes=3", "--eval_every=1"] + TINY_ARGS


def torchrun(script, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(TESTS / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("ddp") / "data")


@pytest.fixture(scope="module")
def ddp_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    proc = torchrun("ddp_probe.py", f"--data_path={data}", f"--output_dir={out}", "--epochs=3", *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout
    return out


def test_ranks_hold_identical_weights(ddp_run):
    a, b = torch.load(ddp_run / "rank0.pt"), torch.load(ddp_run / "rank1.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    saved = ckpt_io.load(ddp_run / "last.pt")["model"]
    for k in a:
        assert torch.equal(a[k], saved[k]), k


def test_evaluation_equals_a_single_process_evaluation(ddp_run, data, capsys):
    last = json.loads((ddp_run / "log.jsonl").read_text().splitlines()[-1])["test"]
    assert last["samples"] == 9  # every test image counted once over the two ranks
    assert train.main({"data_path": str(data), "output_dir": str(ddp_run)},
                      ARGS + ["--test_only", f"--resume={ddp_run / 'last.pt'}"]) == 0
    printed = capsys.readouterr().out
    assert (f"test concat {last['acc_concat']:.2f}% com2 {last['acc_com2']:.2f}% combined "
            f"{last['acc_combined']:.2f}% loss {last['loss']:.4f} on 9 images") in printed


def test_logs_written_once(ddp_run):
    lines = (ddp_run / "results_train.txt").read_text().splitlines()
    assert [int(line.split()[1]) for line in lines] == [0, 1, 2]


def test_stop_and_resume_under_torchrun(ddp_run, data, tmp_path):
    out = tmp_path / "stopped"
    common = [f"--data_path={data}", f"--output_dir={out}", "--epochs=3", *ARGS]
    proc = torchrun("killer.py", "sigterm", "8", *common)  # each rank signals itself once
    assert proc.returncode != 0
    assert "stopped by SIGTERM at epoch 2, batch 2" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    proc = torchrun("killer.py", "none", "0", *common, "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = ckpt_io.load(out / "last.pt"), ckpt_io.load(ddp_run / "last.pt")
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert (out / "results_train.txt").read_text() == (ddp_run / "results_train.txt").read_text()


def test_skipped_images_do_not_desynchronise_the_ranks(tmp_path):
    data = make_image_folder(tmp_path / "data")
    for name in ("2.jpg", "5.jpg"):  # some batch of 2 per rank will lose a sample
        bad = data / "train" / "class_1" / name
        bad.write_bytes(bad.read_bytes()[:300])
    out = tmp_path / "run"
    proc = torchrun("killer.py", "none", "0", f"--data_path={data}", f"--output_dir={out}",
                    "--epochs=2", "--skip_bad_images", "--check_images=none", *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [2, 2]


def test_validation_split_over_two_processes(data, tmp_path, capsys):
    """--val_split under torchrun: the hold-out is the same on both ranks, each validation and
    the one test of best.pt count every image once, and that test equals --test_only's."""
    out = tmp_path / "run"
    proc = torchrun("killer.py", "none", "0", f"--data_path={data}", f"--output_dir={out}",
                    "--epochs=2", "--val_split=0.25", *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "18 train / 6 validation / 9 test images" in proc.stdout
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["val"]["samples"] for r in records] == [6, 6]
    final = ckpt_io.load(out / "last.pt")["final_test"]
    assert final["samples"] == 9
    assert train.main({"data_path": str(data), "output_dir": str(out)},
                      ARGS + ["--test_only"]) == 0
    assert (f"combined {final['acc_combined']:.2f}% loss {final['loss']:.4f} on 9 images"
            in capsys.readouterr().out)
