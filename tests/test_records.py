"""Model selection on a validation split, TensorBoard records, 1-based epochs in log.jsonl, and
the tools agreeing with --test_only on what the model predicts."""
import json
import sys

import pytest
import torch

from cmal import checkpoint as ckpt_io
from cmal import settings
from cmal import train
from cmal.data import VAL_SPLIT, check_layout, hold_out
from tests.conftest import TINY_ARGS, make_image_folder


def _train(data, out, *argv):
    torch.manual_seed(0)
    return train.main({"data_path": str(data), "output_dir": str(out)}, [*TINY_ARGS, *argv])


@pytest.fixture(scope="module")
def validated_run(tmp_path_factory):
    """A tiny run holding out a quarter of train, with every evaluation call recorded by the
    number of images it scored."""
    root = tmp_path_factory.mktemp("val")
    data = make_image_folder(root / "data")
    scored = []
    real = train.evaluate

    def spy(net, loader, *args, **kwargs):
        scored.append(len(loader.dataset))
        return real(net, loader, *args, **kwargs)

    train.evaluate = spy
    try:
        assert _train(data, root / "run", "--epochs=3", "--eval_every=1",
                      "--val_split=0.25") == 0
    finally:
        train.evaluate = real
    return data, root / "run", scored


def test_hold_out_is_stratified_seeded_and_disjoint():
    samples = [(f"c{c}/{i}.jpg", c) for c in range(3) for i in range(8 if c else 3)]
    kept, held = hold_out(samples, 0.25, seed=0)
    assert sorted(kept + held) == sorted(samples) and not set(kept) & set(held)
    per_class = [sum(1 for _, t in held if t == c) for c in range(3)]
    assert per_class == [1, 2, 2]  # round(0.25 * n), at least one
    assert hold_out(samples, 0.25, seed=0) == (kept, held)
    assert any(hold_out(samples, 0.25, seed=s)[1] != held for s in range(1, 5))
    # Never the whole class: one image is left to train on.
    assert sum(1 for _, t in hold_out(samples, 0.9, seed=0)[0] if t == 0) == 1


def test_val_split_values_are_parsed_and_checked():
    assert settings.parse_val_split("0.10") == "0.1"
    assert settings.parse_val_split("Folder") == "folder"
    for bad in ("1.5", "0", "ten"):
        with pytest.raises(Exception) as exc:
            settings.parse_val_split(bad)
        assert bad in str(exc.value)


def test_best_is_chosen_on_validation_and_test_is_scored_once(validated_run):
    data, out, scored = validated_run
    # 6 of the 24 training images validate each of the 3 epochs; the 9 test images are scored
    # once, after the last epoch.
    assert scored == [6, 6, 6, 9]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert all("val" in r and "test" not in r for r in records)
    last = ckpt_io.load(out / "last.pt")
    best = max(range(3), key=lambda e: (records[e]["val"]["acc_combined"], -e))
    assert last["best_epoch"] == best and last["best_acc"] == records[best]["val"]["acc_combined"]
    final = last["final_test"]
    assert final["samples"] == 9
    test_lines = (out / "results_test.txt").read_text().splitlines()
    assert test_lines == [ckpt_io.test_line(best, final).strip()]
    # The once-scored test result is best.pt's, as --test_only computes it.
    result = ckpt_io.load(out / "best.pt")
    assert result["epoch"] == best + 1
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[0].split(",")[4] == "eval_acc_concat" and len(rows) == 4
    assert float(rows[1].split(",")[6]) == records[0]["val"]["acc_combined"]


def test_final_test_equals_test_only_on_best(validated_run, capsys):
    data, out, _ = validated_run
    final = ckpt_io.load(out / "last.pt")["final_test"]
    capsys.readouterr()
    assert train.main({"data_path": str(data), "output_dir": str(out)},
                      ["--test_only", "--device=cpu", "--workers=0", "--progress=false",
                       "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert f"combined {final['acc_combined']:.2f}% loss {final['loss']:.4f} on 9 images" in printed


def test_val_split_is_a_setting_of_the_run(validated_run, capsys):
    data, out, _ = validated_run
    capsys.readouterr()
    assert _train(data, out, "--resume", "--epochs=3", "--eval_every=1", "--val_split=none") == 2
    assert "--val_split=none (it was trained with 0.25)" in capsys.readouterr().err


def test_val_folder(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    with pytest.raises(Exception) as exc:
        _train_raising(data, tmp_path / "a", "--val_split=folder")
    assert "has no 'val' folder" in str(exc.value) and "--val_split=0.1" in str(exc.value)
    for c in range(3):  # a val/ folder with two images per class
        folder = data / VAL_SPLIT / f"class_{c}"
        folder.mkdir(parents=True)
        for i in range(2):
            (folder / f"{i}.jpg").write_bytes((data / "test" / f"class_{c}" / f"{i}.jpg")
                                              .read_bytes())
    assert sorted(check_layout(data, with_val=True)[1]) == ["test", "train", "val"]
    assert sorted(check_layout(data)[1]) == ["test", "train"]
    capsys.readouterr()
    assert _train(data, tmp_path / "b", "--epochs=1", "--val_split=folder") == 0
    assert "24 train / 6 validation / 9 test images" in capsys.readouterr().out
    # Present but not asked for: the reference's protocol, and a warning that says so.
    with pytest.warns(UserWarning, match="is not used: best.pt is chosen on test"):
        assert _train(data, tmp_path / "c", "--epochs=1") == 0
    (data / VAL_SPLIT / "class_9").mkdir()
    with pytest.raises(Exception, match="does not hold the class folders"):
        check_layout(data, with_val=True)
    check_layout(data)  # a val/ folder not used is not checked either


def _train_raising(data, out, *argv):
    from cmal.train import run
    cfg = settings.parse({"data_path": str(data), "output_dir": str(out)}, [*TINY_ARGS, *argv])
    return run(cfg)


def test_tensorboard_scalars_per_epoch_and_no_duplicates_after_resume(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is in requirements.txt; make setup installs it")
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert _train(data, out, "--epochs=1", "--tensorboard") == 0
    assert _train(data, out, "--resume", "--extend", "--epochs=2") == 0
    logs = event_accumulator.EventAccumulator(str(out / ckpt_io.TENSORBOARD_DIR))
    logs.Reload()
    tags = logs.Tags()["scalars"]
    assert {"train/train_acc", "train/loss_att", "train/lr", "test/acc_combined",
            "test/loss"} <= set(tags)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    events = logs.Scalars("test/acc_combined")
    assert [e.step for e in events] == [1, 2]
    assert [e.value for e in events] == pytest.approx([r["test"]["acc_combined"]
                                                      for r in records])
    # --overwrite removes the event files with the rest of the run.
    assert _train(data, out, "--epochs=1", "--overwrite") == 0
    assert not (out / ckpt_io.TENSORBOARD_DIR).exists()


def test_tensorboard_missing_is_named_with_the_fix(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    with pytest.raises(SystemExit) as exc:
        settings.parse({"data_path": "d"}, ["--tensorboard"])
    assert exc.value.code == 2
    assert "pip install tensorboard" in capsys.readouterr().err


def test_plot_curves_reads_logs_counted_from_0_or_1(validated_run, tmp_path):
    from cmal.tools import plot_curves
    _, out, _ = validated_run
    _, records = plot_curves.read_log(out)
    old = tmp_path / "log.jsonl"  # as runs wrote it before log.jsonl counted from 1
    old.write_text("".join(json.dumps({**r, "epoch": r["epoch"] - 1}) + "\n" for r in records))
    assert plot_curves.read_log(old)[1] == records
    assert plot_curves._series(records, "acc_combined", "val")[0] == [1, 2, 3]


def test_predict_agrees_with_test_only(validated_run, capsys):
    """The tools and --test_only load the network, sizes and classes the same way: predict's
    top class over the test split gives --test_only's combined accuracy."""
    from cmal.tools import predict
    data, out, _ = validated_run
    capsys.readouterr()
    assert predict.main([str(out / "best.pt"), str(data / "test"), "--topk=1",
                         "--device=cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    pairs = [(lines[i], lines[i + 1].split()[1]) for i in range(0, len(lines), 2)]
    correct = sum(path.split("/")[-2] == top for path, top in pairs)
    final = ckpt_io.load(out / "last.pt")["final_test"]
    assert len(pairs) == 9 and 100 * correct / 9 == pytest.approx(final["acc_combined"])


def test_baseline_with_a_validation_split(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    assert _train(data, tmp_path / "run", "--epochs=2", "--eval_every=1", "--val_split=0.25",
                  "--method=baseline") == 0
    printed = capsys.readouterr().out
    assert "on test, scored once: acc" in printed and "best single-head validation" in printed
    last = ckpt_io.load(tmp_path / "run" / "last.pt")
    assert last["final_test"]["samples"] == 9
    assert all("val" in r for r in last["history"])


def test_extending_a_validated_run_scores_its_best_on_test_again(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert _train(data, out, "--epochs=1", "--eval_every=1", "--val_split=0.25") == 0
    assert "on test, scored once" in capsys.readouterr().out
    assert _train(data, out, "--resume", "--extend", "--epochs=2") == 0
    printed = capsys.readouterr().out
    assert "on test, scored once" in printed  # best.pt may be another epoch's now
    last = ckpt_io.load(out / "last.pt")
    assert (out / "results_test.txt").read_text().splitlines() == \
        [ckpt_io.test_line(last["best_epoch"], last["final_test"]).strip()]
    # Resuming the finished run again scores nothing and changes nothing.
    before = (out / "results_test.txt").read_text()
    assert _train(data, out, "--resume") == 0
    assert "on test, scored once" not in capsys.readouterr().out
    assert (out / "results_test.txt").read_text() == before


def test_a_validated_run_resumed_elsewhere_needs_its_best(validated_run, tmp_path, capsys):
    data, out, _ = validated_run
    capsys.readouterr()
    # (A finished run resumed as it is trains nothing, and needs nothing: it is extended here.)
    assert _train(data, tmp_path / "elsewhere", f"--resume={out / 'last.pt'}", "--extend",
                  "--epochs=4") == 2
    err = capsys.readouterr().err
    assert "best.pt is missing" in err and "copy the best.pt" in err
