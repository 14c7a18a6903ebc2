"""Whole runs of the training CLI on a tiny generated dataset: logs, checkpoints, resume,
evaluation-only, reproducibility."""
import importlib.util
import json
import re

import pytest
import torch

from cmal import checkpoint as ckpt_io
from cmal import settings
from cmal import train
from tests.conftest import TINY_ARGS, make_image_folder
from tests.run_records import assert_same_records

TRAIN_LINE = re.compile(r"^Iteration \d+ \| train_acc = \d+\.\d{5} \| train_loss = \d+\.\d{5} \| "
                        r"Loss1: \d+\.\d{3} \| Loss2: \d+\.\d{5} \| Loss3: \d+\.\d{5} \| "
                        r"Loss_ATT: \d+\.\d{5} \| Loss_concat: \d+\.\d{5} \|$")
TEST_LINE = re.compile(r"^Iteration \d+, test_acc_combined = \d+\.\d{5}, test_loss = \d+\.\d{6}$")


def run(data, out, *extra):
    return train.main({"data_path": str(data), "num_classes": 3, "output_dir": str(out)},
                      TINY_ARGS + list(extra))


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_end_to_end_logs_and_checkpoints(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(image_folder, out, "--epochs=3", "--eval_every=2") == 0
    printed = capsys.readouterr().out
    assert len(re.findall(r"^epoch +\d/3 \| train acc", printed, re.M)) == 3
    assert "test concat" in printed and "combined" in printed
    train_lines = (out / "results_train.txt").read_text().splitlines()
    assert [int(line.split()[1]) for line in train_lines] == [0, 1, 2]
    assert all(TRAIN_LINE.match(line) for line in train_lines), train_lines
    test_lines = (out / "results_test.txt").read_text().splitlines()
    assert [int(line.split()[1].rstrip(",")) for line in test_lines] == [1, 2]  # every 2nd + last
    assert all(TEST_LINE.match(line) for line in test_lines), test_lines
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]  # log.jsonl counts as people do
    last = ckpt_io.load(out / "last.pt")
    assert last["epoch"] == 3 and last["stats"] is None
    assert last["classes"] == ["class_0", "class_1", "class_2"]
    assert set(last) >= {"model", "optimizer", "epoch", "best_acc", "settings", "rng", "history"}
    best = ckpt_io.load(out / "best.pt")
    assert best["best_acc"] == max(r["test"]["acc_combined"] for r in records if "test" in r)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))


def test_reference_evaluation_schedule():
    cfg = settings.parse({"data_path": "x"}, [])
    evaluated = [e for e in range(200) if train.should_evaluate(e, cfg)]
    assert evaluated == list(range(5)) + list(range(100, 200))


def test_seeded_runs_are_identical(image_folder, tmp_path):
    assert run(image_folder, tmp_path / "a", "--epochs=2") == 0
    assert run(image_folder, tmp_path / "b", "--epochs=2") == 0
    assert_same_weights(weights(tmp_path / "a" / "last.pt"), weights(tmp_path / "b" / "last.pt"))
    assert (tmp_path / "a" / "results_train.txt").read_text() == \
        (tmp_path / "b" / "results_train.txt").read_text()
    assert run(image_folder, tmp_path / "c", "--epochs=2", "--seed=1") == 0
    assert not torch.equal(weights(tmp_path / "a" / "last.pt")["classifier1.4.weight"],
                           weights(tmp_path / "c" / "last.pt")["classifier1.4.weight"])


def _stop_after(monkeypatch, calls):
    """Make the n-th stop check report a SIGTERM (one check per iteration, one per epoch end)."""
    count = {"n": 0}

    def requested(self):
        count["n"] += 1
        if count["n"] == calls:
            self.signal = "SIGTERM"
        return self.signal is not None
    monkeypatch.setattr(train.StopRequest, "requested", requested)


def _stop_in_evaluation(monkeypatch, calls):
    """Make a SIGTERM arrive during the n-th evaluation, before its first batch."""
    real_enter, real_evaluate = train.StopRequest.__enter__, train.evaluate
    seen = {"stop": None, "n": 0}

    def enter(self):
        seen["stop"] = self
        return real_enter(self)

    def evaluate(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] == calls:
            seen["stop"].signal = "SIGTERM"
        return real_evaluate(*args, **kwargs)
    monkeypatch.setattr(train.StopRequest, "__enter__", enter)
    monkeypatch.setattr(train, "evaluate", evaluate)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 3-epoch run evaluated every epoch, with TensorBoard records where tensorboard is
    installed: what every stopped and resumed run must end as."""
    root = tmp_path_factory.mktemp("uninterrupted")
    data = make_image_folder(root / "data")
    assert run(data, root / "full", *STOPPED_RUN) == 0
    return data, root / "full"


STOPPED_RUN = ["--epochs=3", "--eval_every=1"] + (
    ["--tensorboard"] if importlib.util.find_spec("tensorboard") else [])


# 6 iterations per epoch. Check 4: inside epoch 1; 6: its last iteration; 7: after its
# evaluation (an epoch boundary); 10: inside epoch 2; 13: epoch 2's last iteration. Evaluation 2
# and 3: epochs 2 and 3, whose scheduled learning rates are below the base rates.
@pytest.mark.parametrize("stop, epoch, position", [
    (("check", 4), 0, 4), (("check", 6), 0, 6), (("check", 7), 1, None), (("check", 10), 1, 3),
    (("check", 13), 1, 6), (("evaluation", 2), 1, 6), (("evaluation", 3), 2, 6)])
def test_stop_and_resume_equals_an_uninterrupted_run(uninterrupted, tmp_path, monkeypatch,
                                                     stop, epoch, position):
    image_folder, full = uninterrupted
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        (_stop_after if stop[0] == "check" else _stop_in_evaluation)(m, stop[1])
        assert run(image_folder, out, *STOPPED_RUN) == 143
    ck = ckpt_io.load(out / "last.pt")
    assert ck["epoch"] == epoch
    assert (ck["stats"] and ck["stats"]["position"]) == position
    assert run(image_folder, out, *STOPPED_RUN, "--resume") == 0
    assert_same_weights(ckpt_io.load(full / "last.pt")["model"],
                        ckpt_io.load(out / "last.pt")["model"])
    assert_same_records(out, full)


def test_test_only_scores_a_checkpoint(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(image_folder, out, "--epochs=2", "--eval_every=1") == 0
    best = ckpt_io.load(out / "best.pt")
    capsys.readouterr()
    assert run(image_folder, out, "--test_only") == 0
    printed = capsys.readouterr().out
    expected = [r["test"]["acc_combined"] for r in best["history"] if r["epoch"] == best["best_epoch"]][0]
    assert f"combined {expected:.2f}%" in printed
    assert run(image_folder, out, "--test_only", f"--resume={out / 'last.pt'}") == 0


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_bad_checkpoints_give_clear_errors_and_change_nothing(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(image_folder, out, "--epochs=1") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    good = (out / "last.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 3])
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    ck = torch.load(out / "last.pt", weights_only=True)
    torch.save({**ck, "payload": _Evil(tmp_path / "pwned")}, tmp_path / "evil.pt")
    four = make_image_folder(tmp_path / "four", classes=4)
    assert train.main({"data_path": str(four), "num_classes": 4, "output_dir": str(tmp_path / "o4")},
                      TINY_ARGS + ["--epochs=1"]) == 0
    cases = [
        (f"--resume={tmp_path / 'missing.pt'}", "does not exist"),
        (f"--resume={tmp_path / 'truncated.pt'}", "truncated or corrupt"),
        (f"--resume={tmp_path / 'foreign.pt'}", "not a CMAL-Net training checkpoint"),
        (f"--resume={tmp_path / 'evil.pt'}", "could run arbitrary code"),
        # Another run's checkpoint would replace the one in `out`: refused before anything else.
        (f"--resume={tmp_path / 'o4' / 'last.pt'}", r"already holds a run .* would replace"),
        # With --overwrite, its 4 classes (they come with its settings) do not match the 3 class
        # folders here: refused before the run in `out` is removed.
        (f"--resume={tmp_path / 'o4' / 'last.pt'} --overwrite",
         "trained on other classes than this data_path"),
    ]
    for arg, message in cases:
        assert run(image_folder, out, "--epochs=2", "--extend", *arg.split()) == 2, arg
        assert re.search(message, capsys.readouterr().err), arg
    assert run(image_folder, out, "--epochs=2", "--extend", "--resume", "--width_factor=0.25") == 2
    assert "--width_factor=0.25 (it was trained with 0.125)" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_bad_backbone_weights_create_nothing(image_folder, tmp_path, capsys):
    (tmp_path / "w.pth").write_bytes(b"PK\x03\x04 broken")
    out = tmp_path / "fresh"
    assert run(image_folder, out, f"--weights={tmp_path / 'w.pth'}") == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    assert run(image_folder, out, f"--weights={tmp_path / 'nope.pth'}") == 2
    assert "does not exist" in capsys.readouterr().err
    assert not out.exists()


def test_non_finite_loss_stops_without_touching_checkpoints(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(image_folder, out, "--epochs=1", "--eval_every=1") == 0
    # As if it had been trained at a learning rate that diverges from the next epoch on.
    ck = ckpt_io.load(out / "last.pt")
    ck["settings"].update(lr=1e30, backbone_lr=1e30)
    ckpt_io.save(ck, out / "last.pt")
    (out / ckpt_io.SETTINGS_FILE).unlink()  # rewritten from the checkpoint at every start
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = [a for a in TINY_ARGS if not a.startswith(("--lr=", "--backbone_lr="))]
    assert train.main({"data_path": str(image_folder), "num_classes": 3, "output_dir": str(out)},
                      args + ["--epochs=3", "--extend", "--resume", "--save_every=1"]) == 2
    err = capsys.readouterr().err
    assert "non-finite training loss at epoch 2, batch 1" in err and "no checkpoint was written" in err
    # A resumed run keeps its learning rate (--lr would contradict the checkpoint), and there is
    # no fp16 here to move away from.
    assert "Start a new run with a lower --lr" in err and "--amp" not in err
    after = {p.name: p.read_bytes() for p in out.iterdir() if p.name != ckpt_io.SETTINGS_FILE}
    assert after == before


def test_other_class_names_are_refused(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(image_folder, out, "--epochs=1") == 0
    (image_folder / "train" / "class_2").rename(image_folder / "train" / "class_z")
    (image_folder / "test" / "class_2").rename(image_folder / "test" / "class_z")
    assert run(image_folder, out, "--epochs=2", "--extend", "--resume") == 2
    assert "trained on other classes" in capsys.readouterr().err
    assert run(image_folder, out, "--test_only", f"--resume={out / 'last.pt'}") == 2
    assert "class_z" in capsys.readouterr().err


def test_a_finished_run_is_not_overwritten_by_accident(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(image_folder, out, "--epochs=1") == 0
    before = (out / "last.pt").read_bytes()
    assert run(image_folder, out, "--epochs=1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "last.pt").read_bytes() == before
    assert run(image_folder, out, "--epochs=1", "--overwrite") == 0


def test_num_classes_defaults_to_the_class_folders(image_folder, tmp_path):
    out = tmp_path / "run"
    assert train.main({"data_path": str(image_folder), "output_dir": str(out)},
                      TINY_ARGS + ["--epochs=1"]) == 0
    assert weights(out / "last.pt")["classifier_concat.4.weight"].shape[0] == 3


def test_mid_epoch_resume_needs_the_same_batches(image_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_after(m, 3)
        assert run(image_folder, out, "--epochs=2") == 143
    assert run(image_folder, out, "--epochs=2", "--resume", "--batch_size=2") == 2
    assert "--batch_size=2 (it was trained with 4)" in capsys.readouterr().err
