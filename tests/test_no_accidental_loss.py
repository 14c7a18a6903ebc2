"""No command replaces or deletes a run's checkpoints, logs, reports or exports unless the user
asked for exactly that; --overwrite checks the new run's inputs before it removes anything, and
an export folder's files always describe one checkpoint."""
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from cmal import checkpoint as ckpt_io
from cmal.files import RunLock
from cmal.run_logs import SUMMARY_COLUMNS
from cmal.inference import load_trained
from cmal import export, train
from cmal.tools import export as export_tool
from tests.conftest import TINY_ARGS, make_image_folder

ROOT = Path(__file__).resolve().parents[1]


def _train(data, out, *extra, **block):
    """train.main with a dataset script's settings block (`block`) and a command line."""
    return train.main({"data_path": str(data), "num_classes": 3, "output_dir": str(out),
                       **block}, TINY_ARGS + list(extra))


def snapshot(folder):
    """Every file under `folder` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("loss") / "data")


@pytest.fixture
def finished(data, tmp_path):
    """A finished one-epoch run, evaluated, in its own folder."""
    out = tmp_path / "run"
    assert _train(data, out, "--epochs=1", "--eval_every=1") == 0
    assert (out / "best.pt").exists()
    return out


# --- --extend ----------------------------------------------------------------------------------

def test_extend_needs_epochs_on_the_command_line(data, finished, capsys):
    before = snapshot(finished)
    capsys.readouterr()
    # A dataset script's epochs (or the default 200) would retrain to a number nobody chose.
    assert _train(data, finished, "--resume", "--extend", epochs=3) == 2
    err = capsys.readouterr().err
    assert "--extend needs --epochs=N on the command line, N above the 1 epochs" in err
    assert snapshot(finished) == before
    assert _train(data, finished, "--resume", "--extend", "--epochs=2") == 0
    out = capsys.readouterr().out
    assert "epochs=1, extended to 2 (--extend)" in out.split("\n")[0]  # the settings line
    assert ckpt_io.load(finished / "last.pt")["epoch"] == 2


def test_extend_without_resume_is_refused(data, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        _train(data, out, "--extend", "--epochs=2")
    assert exc.value.code == 2
    assert "--extend continues a finished run and needs --resume" in capsys.readouterr().err
    # --resume in a folder with nothing to resume: not a new run under --extend's name either.
    assert _train(data, out, "--resume", "--extend", "--epochs=2") == 2
    err = capsys.readouterr().err
    assert "--extend continues a finished run" in err and "does not exist" in err
    assert not out.exists()


def test_more_epochs_for_an_unfinished_run_says_to_finish_it_first(data, tmp_path, monkeypatch,
                                                                  capsys):
    # "add --extend" here led to a second refusal: --extend continues only a finished run.
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        calls = iter(range(1, 100))  # 6 iterations and one check at the epoch's end: the 7th
        m.setattr(train.StopRequest, "requested", lambda self: next(calls) == 7)
        assert _train(data, out, "--epochs=3", "--eval_every=1") == 143
    before = snapshot(out)
    capsys.readouterr()
    assert _train(data, out, "--resume", "--epochs=5") == 2
    err = capsys.readouterr().err
    assert "--epochs=5 (it was trained with 3)" in err and "add --extend" not in err
    assert "The run stopped at the end of epoch 1 (of 3 epochs): finish it with --resume alone; then " \
           "--resume --extend --epochs=N (N above 3) trains it further." in err
    assert snapshot(out) == before


# --- a finished run, resumed ---------------------------------------------------------------

def test_resuming_a_finished_run_says_so_and_writes_nothing(data, finished, capsys):
    before = snapshot(finished)
    capsys.readouterr()
    assert _train(data, finished, "--resume", "--workers=1") == 0
    out = capsys.readouterr().out
    assert f"{finished / 'last.pt'} holds a finished run of 1 epochs: best combined test " \
           "accuracy" in out
    assert "nothing to train, nothing written" in out and "--extend --epochs=N" in out
    assert "resumed from" not in out
    assert snapshot(finished) == before


# --- a previous run's files without last.pt ----------------------------------------------------

def test_best_pt_and_logs_without_last_pt_are_not_replaced(data, finished, capsys):
    (finished / "last.pt").unlink()
    before = snapshot(finished)
    capsys.readouterr()
    for extra in ([], ["--resume"]):  # --resume: a fresh start only where nothing was trained
        assert _train(data, finished, "--epochs=1", *extra) == 2, extra
        err = capsys.readouterr().err
        assert f"{finished} already holds a run (best.pt, results_train.txt, results_test.txt, " \
               "log.jsonl, summary.csv)" in err, extra
        # best.pt holds every epoch the logs record: it can be continued from.
        assert f"--resume={finished / 'best.pt'}" in err and "--overwrite" in err
        assert snapshot(finished) == before
    # What the message offers works: the run is finished, so that is all it says.
    assert _train(data, finished, f"--resume={finished / 'best.pt'}") == 0
    assert "holds a finished run" in capsys.readouterr().out
    assert snapshot(finished) == before


@pytest.mark.parametrize("left", ["log.jsonl", "tensorboard", "best_evaluation"])
def test_logs_events_or_reports_alone_are_not_replaced(data, tmp_path, capsys, left):
    out = tmp_path / "run"
    out.mkdir()
    if left == "log.jsonl":
        (out / left).write_text('{"epoch": 1, "train_acc": 50.0}\n')
    else:
        (out / left).mkdir()
        (out / left / "kept").write_text("x")
    assert _train(data, out, "--epochs=1") == 2
    assert "already holds a run" in capsys.readouterr().err
    assert _train(data, out, "--epochs=1", "--overwrite") == 0
    assert not (out / left / "kept").exists()


def test_a_run_that_ended_before_its_first_epoch_is_no_previous_run(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ckpt_io.SETTINGS_FILE).write_text("{}")
    for name in (ckpt_io.TRAIN_LOG, ckpt_io.TEST_LOG, ckpt_io.JSON_LOG):
        (out / name).write_text("")
    (out / ckpt_io.SUMMARY).write_text(",".join(SUMMARY_COLUMNS) + "\n")
    assert _train(data, out, "--epochs=1") == 0


# --- resuming from a folder's own best.pt ------------------------------------------------------

@pytest.fixture
def ahead_of_best(data, tmp_path, monkeypatch):
    """A run of 3 epochs whose best.pt is its state after epoch 1 (its checkpoint then, put
    back as best.pt whichever epoch scored best)."""
    out, first = tmp_path / "run", tmp_path / "epoch1.pt"
    with monkeypatch.context() as m:
        # 6 iterations per epoch, one stop check each and one at the epoch's end: the 7th.
        calls = iter(range(1, 100))
        m.setattr(train.StopRequest, "requested", lambda self: next(calls) == 7)
        assert _train(data, out, "--epochs=3", "--eval_every=1") == 143
    shutil.copyfile(out / "last.pt", first)
    assert ckpt_io.load(first)["epoch"] == 1
    assert _train(data, out, "--resume") == 0
    (out / "best.pt").unlink()
    shutil.copyfile(first, out / "best.pt")
    return out


def test_resuming_from_the_folders_own_best_pt_is_refused(data, ahead_of_best, tmp_path,
                                                          capsys):
    out = ahead_of_best
    best = out / "best.pt"
    before = snapshot(out)
    capsys.readouterr()
    assert _train(data, out, f"--resume={best}") == 2
    err = capsys.readouterr().err
    assert f"--resume={best} would take the run in {out} back to the end of epoch 1 and " \
           "retrain from there, replacing last.pt at the end of epoch 3 and the records of " \
           "epochs 2-3" in err
    assert "continue the run with --resume (from last.pt)" in err
    assert "start a branch from best.pt with another --output_dir" in err
    assert snapshot(out) == before
    # --overwrite would remove best.pt itself: it cannot go with a resume from it.
    assert _train(data, out, f"--resume={best}", "--overwrite") == 2
    assert "leave out one of them" in capsys.readouterr().err
    assert snapshot(out) == before
    # The branch: best.pt continued elsewhere, the run left as it is.
    branch = tmp_path / "branch"
    assert _train(data, branch, f"--resume={best}") == 0
    assert ckpt_io.load(branch / "last.pt")["epoch"] == 3
    assert snapshot(out) == before


def test_resume_and_overwrite_together_are_refused(data, finished, capsys):
    before = snapshot(finished)
    capsys.readouterr()
    for extra in ([], ["--extend", "--epochs=2"]):  # finished or not, it is not for us to pick
        assert _train(data, finished, "--resume", "--overwrite", *extra) == 2, extra
        assert "leave out one of them" in capsys.readouterr().err
        assert snapshot(finished) == before


def test_another_runs_checkpoint_is_resumed_into_a_folder_it_continues(data, finished,
                                                                       tmp_path, capsys):
    """A checkpoint resumed into another folder may find there what its own run wrote (a
    best.pt copied over, as the message for validated runs asks): nothing is lost, no refusal."""
    other = tmp_path / "other"
    other.mkdir()
    shutil.copyfile(finished / "best.pt", other / "best.pt")
    assert _train(data, other, f"--resume={finished / 'last.pt'}", "--extend",
                  "--epochs=2") == 0
    # An older state of the run there would take it back: refused, saying so.
    before = snapshot(other)
    capsys.readouterr()
    assert _train(data, other, f"--resume={finished / 'last.pt'}", "--extend",
                  "--epochs=3") == 2
    assert "(the same run, further on: the end of epoch 2): continue it with --resume" in \
        capsys.readouterr().err
    assert snapshot(other) == before
    # A run of other settings there is another run's: refused without --overwrite.
    third = tmp_path / "third"
    assert _train(data, third, "--epochs=1", "--seed=5") == 0
    before = snapshot(third)
    capsys.readouterr()
    assert _train(data, third, f"--resume={finished / 'last.pt'}", "--extend",
                  "--epochs=2") == 2
    assert f"{third} already holds a run (last.pt, best.pt" in capsys.readouterr().err
    assert snapshot(third) == before


def test_a_validated_run_is_not_resumed_over_another_runs_best(data, finished, tmp_path,
                                                               capsys):
    """With --val_split, the test is scored with the folder's best.pt at the end: resumed into
    a folder of another run, with --overwrite, it would find none of its own (and the other
    run's removed): refused first, the folder untouched."""
    validated = tmp_path / "validated"
    assert _train(data, validated, "--epochs=1", "--eval_every=1", "--val_split=0.25") == 0
    before = snapshot(finished)
    capsys.readouterr()
    assert _train(data, finished, f"--resume={validated / 'last.pt'}", "--extend",
                  "--epochs=2", "--overwrite") == 2
    assert f"{finished / 'best.pt'} is of the run --overwrite would replace" in \
        capsys.readouterr().err
    assert snapshot(finished) == before


# --- --overwrite -------------------------------------------------------------------------------

def test_overwrite_checks_the_new_runs_inputs_before_removing_anything(data, finished,
                                                                       tmp_path, capsys):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"PK\x03\x04 broken")
    before = snapshot(finished)
    cases = [
        ({"data_path": str(tmp_path / "dta")}, [], "does not exist"),  # a typo
        ({"num_classes": 4}, [], "num_classes is 4"),
        ({}, [f"--weights={tmp_path / 'missing.pth'}"], "does not exist"),
        ({}, [f"--weights={broken}"], "truncated or corrupt"),
    ]
    for block, extra, message in cases:
        capsys.readouterr()
        assert _train(data, finished, "--epochs=1", "--overwrite", *extra, **block) == 2, message
        assert message in capsys.readouterr().err
        assert snapshot(finished) == before, message


def test_overwrite_removes_every_file_of_the_previous_run(data, finished, capsys):
    assert _train(data, finished, "--test_only") == 0
    assert (finished / "best_evaluation" / "per_class.csv").exists()
    (finished / "tensorboard").mkdir()
    (finished / "tensorboard" / "events.out.tfevents.old").write_text("old")
    (finished / "notes.txt").write_text("mine")  # not the run's: kept
    # An export of the run's best.pt into its own folder describes that run, and goes with it.
    assert export_tool.main([str(finished / "best.pt"), str(finished),
                             "--format=torchscript"]) == 0
    (finished / "superseded" / "last_epoch1").mkdir(parents=True)
    capsys.readouterr()
    assert _train(data, finished, "--epochs=1", "--overwrite") == 0
    assert "--overwrite: removed the previous run's last.pt, best.pt" in capsys.readouterr().out
    assert not (finished / "best_evaluation").exists()
    assert not (finished / "tensorboard").exists()
    assert not (finished / "model.ts").exists() and not (finished / "model.json").exists()
    assert not (finished / "superseded").exists()
    assert (finished / "notes.txt").read_text() == "mine"


def test_a_new_run_is_not_written_beside_an_export(data, finished, tmp_path, capsys):
    out = tmp_path / "exported"
    assert export_tool.main([str(finished / "best.pt"), str(out), "--format=torchscript"]) == 0
    before = snapshot(out)
    capsys.readouterr()
    assert _train(data, out, "--epochs=1") == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a run (model.ts, model.json)" in err and "--overwrite" in err
    assert snapshot(out) == before


def test_a_resumed_run_sets_aside_what_described_the_checkpoints_it_replaces(data, finished,
                                                                             capsys):
    """--test_only reports and an export of last.pt or best.pt describe that state: a resumed
    run that replaces the file moves them to superseded/, named for the state, and keeps them."""
    run = finished
    ck = ckpt_io.load(run / "last.pt")
    ck["best_acc"] = -1.0  # so that the next evaluated epoch certainly replaces best.pt
    ckpt_io.save(ck, run / "last.pt")
    assert _train(data, run, "--test_only", f"--resume={run / 'last.pt'}") == 0
    assert _train(data, run, "--test_only") == 0
    assert export_tool.main([str(run / "last.pt"), str(run), "--format=torchscript"]) == 0
    report, manifest = (run / "last_evaluation" / "per_class.csv").read_bytes(), \
        (run / "model.json").read_bytes()
    best_report = (run / "best_evaluation" / "per_class.csv").read_bytes()
    capsys.readouterr()
    assert _train(data, run, "--resume", "--extend", "--epochs=3") == 0
    out = capsys.readouterr().out
    kept = run / "superseded" / "last_epoch1"
    assert f"last.pt is replaced by this run's state: what described the previous one " \
           f"(last_evaluation, model.json, model.ts) is kept in {kept}" in out
    assert (kept / "last_evaluation" / "per_class.csv").read_bytes() == report
    assert (kept / "model.json").read_bytes() == manifest and (kept / "model.ts").exists()
    assert not (run / "last_evaluation").exists() and not (run / "model.json").exists()
    assert ckpt_io.load(run / "best.pt")["best_epoch"] == 1
    moved = run / "superseded" / "best_epoch1" / "best_evaluation" / "per_class.csv"
    assert moved.read_bytes() == best_report and not (run / "best_evaluation").exists()
    # The folder with superseded/ is still the run's: a new run there needs --overwrite.
    assert "superseded/" in ckpt_io.previous_run_files(run)


def test_a_set_aside_that_fails_is_a_warning_and_the_run_saves_on(data, finished, capsys):
    run = finished
    assert _train(data, run, "--test_only", f"--resume={run / 'last.pt'}") == 0
    (run / "best_evaluation").mkdir()  # empty: describes nothing, stays
    (run / "superseded").write_text("a file where the folder would go")
    capsys.readouterr()
    assert _train(data, run, "--resume", "--extend", "--epochs=2") == 0
    out = capsys.readouterr().out
    assert "warning: last.pt is replaced by this run's state, and what described the previous " \
           "one (last_evaluation) could not be moved to " in out and "move it away" in out
    assert ckpt_io.load(run / "last.pt")["epoch"] == 2
    assert (run / "last_evaluation" / "per_class.csv").exists()
    assert (run / "best_evaluation").is_dir() and "best.pt is replaced" not in out


def test_a_model_json_of_another_tool_is_no_export(data, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "model.json").write_text('{"name": "my notes"}')
    assert _train(data, out, "--epochs=1") == 0
    assert (out / "model.json").read_text() == '{"name": "my notes"}'
    assert _train(data, out, "--epochs=1", "--overwrite") == 0
    assert (out / "model.json").read_text() == '{"name": "my notes"}'


# --- export --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_checkpoints(data, tmp_path_factory):
    """(A, B): a trained checkpoint and the same with other weights in its heads."""
    root = tmp_path_factory.mktemp("ckpts")
    assert _train(data, root / "run", "--epochs=1") == 0
    a = root / "run" / "last.pt"
    ck = ckpt_io.load(a)
    for name, value in ck["model"].items():
        if value.is_floating_point() and name.startswith("classifier"):
            ck["model"][name] = value + 0.5
    b = root / "b.pt"
    ckpt_io.save(ck, b)
    return a, b


def exported_from(folder, fmt="torchscript"):
    """The checkpoint whose network `folder`'s file of `fmt` computes, of those model.json
    might name, checked against model.json: it names that checkpoint."""
    info = json.loads((folder / export.MANIFEST).read_text())
    named = Path(info["checkpoint"])
    model, _, cfg = load_trained(named, "cpu")
    images = export.example_images(cfg.image_size, batch=2, seed=3)
    with torch.no_grad():
        want = export.predictor_for(model)(images)[0]
    got = export.load_exported(folder / export.FILE_NAMES[fmt], fmt)(images)[0]
    assert (got - want).abs().max() <= 1e-4, f"{folder}: model.json names {named}, not the " \
                                              "network the files compute"
    return named


def test_export_overwrite_replaces_every_file_of_the_previous_export(two_checkpoints,
                                                                    tmp_path):
    a, b = two_checkpoints
    out = tmp_path / "exported"
    assert export_tool.main([str(a), str(out), "--format=export,torchscript"]) == 0
    # Without --overwrite, a previous export of any format is kept, whatever is asked now.
    (out / "model.ts").unlink()
    assert export_tool.main([str(b), str(out), "--format=torchscript"]) == 2
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.pt2"]
    assert export_tool.main([str(b), str(out), "--format=torchscript", "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.ts"]
    assert exported_from(out) == b


def test_two_exports_into_one_folder_do_not_mix(two_checkpoints, tmp_path, monkeypatch,
                                                capsys):
    """The second export, started while the first writes, stops with one line; the first's
    files are whole and all of its checkpoint."""
    a, b = two_checkpoints
    out = tmp_path / "exported"
    writing, go_on = threading.Event(), threading.Event()
    real = export.load_exported

    def paused(path, fmt, device="cpu"):  # the first export, with its file written, waits
        writing.set()
        assert go_on.wait(60)
        return real(path, fmt, device)
    monkeypatch.setattr(export, "load_exported", paused)
    status = []
    first = threading.Thread(target=lambda: status.append(
        export_tool.main([str(a), str(out), "--format=torchscript", "--overwrite"])))
    first.start()
    try:
        assert writing.wait(60)
        monkeypatch.setattr(export, "load_exported", real)
        capsys.readouterr()
        assert export_tool.main([str(b), str(out), "--format=torchscript", "--overwrite"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{out} is in use by another export (process " \
            f"{os.getpid()}" in err and "choose another OUT_DIR" in err
    finally:
        go_on.set()
        first.join(120)
    assert status == [0]
    assert exported_from(out) == a
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.ts"]


def test_export_into_a_folder_a_training_run_holds_is_refused(two_checkpoints, tmp_path,
                                                              capsys):
    a, _ = two_checkpoints
    out = tmp_path / "run"
    lock = RunLock(out).acquire()
    try:
        assert export_tool.main([str(a), str(out), "--format=torchscript"]) == 2
        assert "is in use by another training run" in capsys.readouterr().err
    finally:
        lock.release()


def test_two_export_processes_leave_one_whole_export(two_checkpoints, tmp_path):
    """Two processes exporting different checkpoints into one folder at once: each ends with 0
    or one line, and the folder holds one checkpoint's files, no temporary ones."""
    a, b = two_checkpoints
    out = tmp_path / "exported"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-m", "cmal.tools.export", str(c), str(out),
                               "--format=torchscript", "--overwrite"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in (a, b)]
    results = [(p.wait(300), p.stderr.read()) for p in procs]
    for status, err in results:
        assert status in (0, 2) and "Traceback" not in err, err
        if status == 2:
            assert "is in use by another export" in err.splitlines()[-1], err
    assert any(status == 0 for status, _ in results)
    assert exported_from(out) in (a, b)
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.ts"]
