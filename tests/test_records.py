"""Model selection on a validation split, TensorBoard records, 1-based epochs in log.jsonl, and
the tools agreeing with --test_only on what the model predicts."""
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
import torch

from cmal import checkpoint as ckpt_io
from cmal import run_logs
from cmal import settings
from cmal import train
from cmal.data import HOLDOUT_PERMUTATION, hold_out, holdout_record, mix_seed
from cmal.folders import VAL_SPLIT, check_layout
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


def _held_by_class(samples, seed=0, fraction=0.25):
    held = hold_out(samples, fraction, seed, root="/d/train")[1]
    return {c: {p for p, t in held if t == c} for c in {t for _, t in samples}}


def _class_samples(counts):
    return [(f"/d/train/c{c}/{i:03d}.jpg", c) for c, n in enumerate(counts) for i in range(n)]


def test_each_class_hold_out_depends_only_on_its_own_images():
    """An image added to, removed from or renamed in one class moves no other class's
    validation images; in its own class the old images held out stay a prefix of one ranking,
    so only the new image, and at most one other, changes sides."""
    samples = _class_samples([20, 13, 17, 9])
    before = _held_by_class(samples)
    for c in range(4):
        for seed in range(5):
            before = _held_by_class(samples, seed)
            added = samples + [(f"/d/train/c{c}/new_{seed}.jpg", c)]
            removed = [s for s in samples if s[0] != sorted(before[c])[0]]
            renamed = [(p.replace("/005.", "/005b.") if t == c else p, t) for p, t in samples]
            for changed in (added, removed, renamed):
                after = _held_by_class(sorted(changed, key=lambda s: s[1]), seed)
                assert all(after[o] == before[o] for o in range(4) if o != c), (c, seed)
                olds = {p for p, _ in samples}
                kept_before, kept_after = before[c] & {p for p, _ in changed}, after[c] & olds
                assert kept_before <= kept_after or kept_after <= kept_before
                assert len(kept_before ^ kept_after) <= 1


def test_hold_out_does_not_depend_on_the_order_files_are_listed_in():
    samples = _class_samples([12, 7, 30])
    kept, held = hold_out(samples, 0.2, 3, root="/d/train")
    shuffled = samples[:]
    random.Random(0).shuffle(shuffled)
    kept_s, held_s = hold_out(shuffled, 0.2, 3, root="/d/train")
    assert set(held_s) == set(held) and set(kept_s) == set(kept)
    assert held_s == [s for s in shuffled if s in set(held)]  # each keeps the order it was given
    # Nor on where the dataset lies: the paths below train/ decide.
    moved = [(p.replace("/d/", "/elsewhere/data/"), t) for p, t in samples]
    assert [p for p, _ in hold_out(moved, 0.2, 3, root="/elsewhere/data/train")[1]] == \
        [p.replace("/d/", "/elsewhere/data/") for p, _ in held]


def test_hold_out_of_file_names_that_are_not_utf8(tmp_path):
    """Linux file names are bytes: one that is not UTF-8 is ranked by its bytes and recorded
    in a checkpoint as it is."""
    import os
    names = ["a.jpg", os.fsdecode(b"caf\xe9.jpg"), "b.jpg", "c.jpg"]
    samples = [(f"/d/train/c0/{n}", 0) for n in names]
    held = hold_out(samples, 0.5, 0, root="/d/train")[1]
    record = holdout_record(held, "/d/train", "ranked")
    ckpt_io.save({"holdout": record}, tmp_path / "x.pt")
    assert torch.load(tmp_path / "x.pt", weights_only=True)["holdout"] == record
    assert len(record["held"]) == 2


def test_the_permutation_draw_is_the_one_earlier_runs_made():
    """Checkpoints that record no hold-out were trained on this draw: a resumed one keeps it."""
    samples = _class_samples([8, 3, 11])
    labels = torch.tensor([t for _, t in samples])
    generator = torch.Generator().manual_seed(mix_seed(7, 0x7A1))
    expected = torch.zeros(len(samples), dtype=torch.bool)
    for target in labels.unique().tolist():  # the code of runs before the record, verbatim
        members = (labels == target).nonzero().flatten()
        count = min(max(1, round(0.3 * len(members))), len(members) - 1)
        expected[members[torch.randperm(len(members), generator=generator)[:count]]] = True
    held = hold_out(samples, 0.3, 7, root="/d/train", method=HOLDOUT_PERMUTATION)[1]
    assert held == [s for s, h in zip(samples, expected.tolist()) if h]


def _files(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


def test_a_resume_whose_hold_out_changed_stops_unless_accepted(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    # Given to a new run, where it changes nothing, it says so; no later resume inherits it.
    assert _train(data, out, "--epochs=1", "--eval_every=1", "--val_split=0.25",
                  "--accept_new_holdout") == 0
    assert "--accept_new_holdout changes nothing here" in capsys.readouterr().out
    record = ckpt_io.load(out / "last.pt")["holdout"]
    assert record["method"] == "ranked" and len(record["held"]) == 6
    assert all((data / "train" / name).is_file() for name in record["held"])
    # A held-out image removed: the next image of its class in the ranking, trained on so far,
    # would become a validation image.
    gone = data / "train" / record["held"][0]
    kept = tmp_path / "kept.jpg"
    shutil.move(gone, kept)
    before = _files(out)
    capsys.readouterr()
    assert _train(data, out, "--resume", "--extend", "--epochs=2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds out other images of" in err[0], err
    assert "held out then, not now: 1 of 6" in err[0] and "held out now, not then: 1" in err[0]
    assert f"classes: {gone.parent.name}" in err[0] and "--accept_new_holdout" in err[0]
    assert _files(out) == before
    # Put back: it resumes.
    shutil.move(kept, gone)
    assert _train(data, out, "--resume", "--extend", "--epochs=2") == 0
    assert ckpt_io.load(out / "last.pt")["holdout"] == record
    # Removed again and accepted: the new hold-out is validated on and recorded.
    gone.unlink()
    capsys.readouterr()
    assert _train(data, out, "--resume", "--extend", "--epochs=3", "--accept_new_holdout") == 0
    assert "--accept_new_holdout: validating on the new hold-out" in capsys.readouterr().out
    now = ckpt_io.load(out / "last.pt")
    assert record["held"][0] not in now["holdout"]["held"] and len(now["holdout"]["held"]) == 6
    assert now["history"][-1]["val"]["samples"] == 6
    assert _train(data, out, "--resume", "--extend", "--epochs=4") == 0  # the new record holds


def test_a_resume_whose_val_folder_changed_stops_unless_accepted(tmp_path, capsys):
    """--val_split=folder: the images of val/ are recorded like a hold-out; a resume that would
    validate on others stops (best.pt's choice would compare accuracies on different images)."""
    data = make_image_folder(tmp_path / "data")
    shutil.copytree(data / "test", data / "val")
    out = tmp_path / "run"
    assert _train(data, out, "--epochs=1", "--eval_every=1", "--val_split=folder") == 0
    record = ckpt_io.load(out / "last.pt")["holdout"]
    assert record == {"method": "folder", "held": sorted(
        p.relative_to(data / "val").as_posix() for p in (data / "val").rglob("*.jpg"))}
    gone = data / "val" / record["held"][0]
    gone.unlink()
    before = _files(out)
    capsys.readouterr()
    assert _train(data, out, "--resume", "--extend", "--epochs=2") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data / 'val'} holds other images than {out / 'last.pt'} was " \
        "validated on: validated on then, not now: 1 of 9 (removed or renamed); new since: 0; " \
        f"classes: {gone.parent.name}" in err[0], err
    assert "--accept_new_holdout to validate on the new images" in err[0]
    assert _files(out) == before
    assert _train(data, out, "--resume", "--extend", "--epochs=2", "--accept_new_holdout") == 0
    now = ckpt_io.load(out / "last.pt")
    assert now["holdout"]["held"] == record["held"][1:]
    assert now["history"][-1]["val"]["samples"] == 8


def test_a_checkpoint_without_a_hold_out_record_resumes_with_a_note(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert _train(data, out, "--epochs=1", "--eval_every=1", "--val_split=0.25") == 0
    for name in ("last.pt", "best.pt"):  # as runs wrote them before the record
        ck = ckpt_io.load(out / name)
        del ck["holdout"]
        ckpt_io.save(ck, out / name)
    capsys.readouterr()
    assert _train(data, out, "--resume", "--extend", "--epochs=2") == 0
    printed = capsys.readouterr().out
    assert sum("does not record its validation images" in line
               for line in printed.splitlines()) == 1
    samples = check_layout(data)[1]["train"]
    legacy = hold_out(samples, 0.25, 0, data / "train", HOLDOUT_PERMUTATION)[1]
    record = ckpt_io.load(out / "last.pt")["holdout"]
    assert record["method"] == HOLDOUT_PERMUTATION
    assert record["held"] == sorted(str(Path(p).relative_to(data / "train")) for p, _ in legacy)


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
    assert test_lines == [run_logs.test_line(best, final).strip()]
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


# Not "final test": a finished run resumed writes nothing (test_no_accidental_loss), so the final
# test's events lost to a kill after the last checkpoint stay lost (log.jsonl and last.pt hold it).
@pytest.mark.parametrize("dies_in", ["epoch 2"])
def test_tensorboard_events_lost_to_a_kill_are_written_on_resume(tmp_path, monkeypatch, dies_in):
    """Killed after a checkpoint and before its TensorBoard events: the resumed run writes them,
    and TensorBoard ends as an uninterrupted run's."""
    pytest.importorskip("tensorboard", reason="tensorboard is in requirements.txt")
    from tests.run_records import tensorboard_scalars
    data = make_image_folder(tmp_path / "data")
    args = ["--epochs=2", "--eval_every=1", "--val_split=0.25", "--tensorboard"]
    assert _train(data, tmp_path / "full", *args) == 0
    real_epoch, real_scalars = ckpt_io.TensorBoardLog.epoch, ckpt_io.TensorBoardLog.scalars

    def epoch(self, record):
        if dies_in == "epoch 2" and record["epoch"] == 1:
            raise KeyboardInterrupt  # as a kill there: the process ends, nothing else is written
        return real_epoch(self, record)

    def scalars(self, split, result, step):
        if dies_in == "final test" and split == "final_test":
            raise KeyboardInterrupt
        return real_scalars(self, split, result, step)
    out = tmp_path / "killed"
    with monkeypatch.context() as m:
        m.setattr(ckpt_io.TensorBoardLog, "epoch", epoch)
        m.setattr(ckpt_io.TensorBoardLog, "scalars", scalars)
        assert _train(data, out, *args) == 130
    assert ckpt_io.load(out / "last.pt")["epoch"] == 2
    assert _train(data, out, *args, "--resume") == 0
    full = tensorboard_scalars(tmp_path / "full")
    assert "final_test/acc_combined" in full and "train/lr" in full
    assert tensorboard_scalars(out) == full


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
        [run_logs.test_line(last["best_epoch"], last["final_test"]).strip()]
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
