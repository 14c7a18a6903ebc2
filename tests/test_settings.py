"""Settings: one schema for the dataset scripts, the command line and checkpoints."""
import subprocess
import sys
from pathlib import Path

import pytest

from cmal import settings
from cmal.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_then_block_then_command_line():
    cfg = settings.parse({"data_path": "d", "epochs": 7, "layers": "1,2,3,4"},
                         ["--epochs=9", "--compile", "--progress=false"])
    assert (cfg.data_path, cfg.epochs, cfg.layers) == ("d", 9, (1, 2, 3, 4))
    assert cfg.compile is True and cfg.progress == "false" and cfg.lr == 0.002


@pytest.mark.parametrize("argv, expected", [
    (["--ep=3"], "unrecognized option --ep (did you mean --epochs?)"),
    (["--batchsize=3"], "unrecognized option --batchsize (did you mean --batch_size?)"),
    (["--amp=bf17"], "invalid choice: 'bf17'"),
    (["--layers=1,x"], "four comma-separated integers"),
])
def test_misspelt_and_prefix_options_are_refused(argv, expected, capsys):
    with pytest.raises(SystemExit) as exc:
        settings.parse({"data_path": "d"}, argv)
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err


def test_unknown_name_in_a_settings_block_is_refused_with_the_closest():
    with pytest.raises(settings.SettingsError, match=r"'batchsize' \(did you mean batch_size\?\)"):
        settings.parse({"data_path": "d", "batchsize": 8})


def test_dataset_script_with_a_misspelt_setting_stops(tmp_path):
    script = (ROOT / "train_Aircraft_TResNet_L.py").read_text().replace(
        "batch_size = 16", "batchsize = 16")
    path = tmp_path / "train_typo.py"
    path.write_text(script)
    proc = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2
    assert "unknown setting 'batchsize' (did you mean batch_size?)" in proc.stderr
    assert "train_typo.py" in proc.stderr


def test_a_settings_blocks_numbers_are_parsed_as_the_command_lines():
    # argparse converts only string defaults: a float batch size failed in the DataLoader with a
    # traceback, and val_split = 0.1 was recorded as 0.1, not '0.1', so a resume with
    # --val_split=0.1 was refused as a contradiction of 0.1.
    cfg = settings.parse({"data_path": "d", "val_split": 0.1, "progress": True, "epochs": 2,
                          "lr": 1}, [])
    assert (cfg.val_split, cfg.progress, cfg.epochs, cfg.lr) == ("0.1", "true", 2, 1.0)
    assert cfg == settings.parse({"data_path": "d"}, ["--val_split=0.1", "--progress=true",
                                                      "--epochs=2", "--lr=1"])
    with pytest.raises(settings.SettingsError, match=r"the settings block sets batch_size = 4.5, "
                                                     r"not a valid value of batch_size"):
        settings.parse({"data_path": "d", "batch_size": 4.5}, [])


def test_dataset_scripts_blocks_are_valid():
    for script in ROOT.glob("train_*_TResNet_L.py"):
        namespace = {"__file__": str(script), "__name__": "block"}
        exec(compile(script.read_text(), str(script), "exec"), namespace)
        block = settings.from_script(namespace)
        assert {"data_path", "num_classes", "epochs", "batch_size", "output_dir",
                "weights"} <= set(block), script.name


def test_checkpoint_round_trip_and_older_checkpoints():
    cfg = Settings(data_path="d", layers=(1, 1, 1, 1), amp="bf16")
    saved = cfg.to_dict()
    assert saved["layers"] == [1, 1, 1, 1]
    assert Settings.from_checkpoint(saved) == cfg
    # A checkpoint written before a setting existed, or after one was removed.
    older = {k: v for k, v in saved.items() if k not in ("sgd", "check_images")}
    older["retired_setting"] = 1
    restored = Settings.from_checkpoint(older)
    assert restored.sgd == "foreach" and restored.check_images == "headers"


def test_validation_names_every_problem(capsys):
    with pytest.raises(SystemExit):
        settings.parse({}, ["--image_size=30", "--resize=20", "--lr=-1"])
    err = capsys.readouterr().err
    assert "--data_path is required" in err and "--image_size must be a multiple of 4" in err
    assert "--resize (20) must be at least" in err and "--lr cannot be negative" in err


@pytest.mark.parametrize("seed", [2 ** 64, -2 ** 63 - 1])
def test_a_seed_beyond_64_bits_is_refused_by_name(seed, capsys):
    # torch's generators take 64 bits: a longer seed was a traceback at the model build.
    with pytest.raises(SystemExit) as exc:
        settings.parse({"data_path": "d"}, [f"--seed={seed}"])
    assert exc.value.code == 2
    assert f"--seed must fit in 64 bits (-2**63 to 2**64 - 1), got {seed}" in \
        capsys.readouterr().err
    for fits in (2 ** 64 - 1, -2 ** 63, -1):
        assert settings.parse({"data_path": "d"}, [f"--seed={fits}"]).seed == fits


def test_given_on_command_line_sees_only_explicit_options():
    given = settings.given_on_command_line(["--epochs=3", "--compile", "--resume", "--lr", "0.1"])
    assert given == {"epochs", "compile", "resume", "lr"}


# --- a checkpoint's settings win over defaults; a contradicting command line is refused ------

def _tiny_run(tmp_path, *extra):
    from cmal import train
    from tests.conftest import TINY_ARGS, make_image_folder
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    assert train.main({"data_path": str(data), "output_dir": str(out)},
                      TINY_ARGS + ["--epochs=1", "--eval_every=1", *extra]) == 0
    return data, out


def _bare(data, out, *argv):
    """train.main with the defaults and only `argv`: nothing of the tiny run's settings."""
    from cmal import train
    return train.main({"data_path": str(data), "output_dir": str(out)},
                      ["--device=cpu", "--progress=false", "--workers=0", *argv])


def test_test_only_evaluates_at_the_trained_size(tmp_path, capsys):
    import json
    data, out = _tiny_run(tmp_path)
    logged = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["test"]
    capsys.readouterr()
    # The defaults say 368 px and the TResNet-L-V2 widths; the checkpoint says 32 px, tiny.
    assert _bare(data, out, "--test_only", f"--resume={out / 'last.pt'}") == 0
    printed = capsys.readouterr().out
    assert f"loss {logged['loss']:.4f} on 9 images" in printed
    assert "image_size=32" in printed and "resize=36" in printed  # named, not silent
    assert _bare(data, out, "--test_only", f"--resume={out / 'last.pt'}", "--image_size=64") == 2
    assert "--image_size=64 (it was trained with 32)" in capsys.readouterr().err


def test_resume_takes_the_checkpoints_settings_and_refuses_contradictions(tmp_path, capsys):
    from cmal import checkpoint as ckpt_io
    data, out = _tiny_run(tmp_path, "--lr=0.01")
    before = (out / "last.pt").read_bytes()
    capsys.readouterr()
    assert _bare(data, out, "--resume", "--lr=0.05") == 2
    err = capsys.readouterr().err
    assert "--lr=0.05 (it was trained with 0.01)" in err and "Leave them out" in err
    assert _bare(data, out, "--resume", "--epochs=2") == 2
    err = capsys.readouterr().err
    assert "--epochs=2 (it was trained with 1)" in err and "add --extend" in err
    assert (out / "last.pt").read_bytes() == before
    # --extend: a finished run continues to more epochs, everything else as it was trained.
    assert _bare(data, out, "--resume", "--epochs=2", "--extend", "--workers=1") == 0
    printed = capsys.readouterr().out
    assert "settings from" in printed and "lr=0.01" in printed
    ck = ckpt_io.load(out / "last.pt")
    assert ck["epoch"] == 2 and ck["settings"]["lr"] == 0.01 and ck["settings"]["image_size"] == 32
    assert ck["settings"]["workers"] == 1  # a safe change is taken


def test_extend_needs_a_finished_run_and_more_epochs(tmp_path, capsys):
    data, out = _tiny_run(tmp_path)
    capsys.readouterr()
    assert _bare(data, out, "--resume", "--epochs=1", "--extend") == 2
    assert "--extend needs --epochs above the 1" in capsys.readouterr().err


def test_progress_bars_only_on_a_terminal_unless_forced(monkeypatch):
    import sys
    cfg = settings.parse({"data_path": "d"}, [])
    assert cfg.progress == "auto"
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not settings.show_progress(cfg)
    assert settings.show_progress(settings.parse({"data_path": "d"}, ["--progress"]))
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert settings.show_progress(cfg)
    assert not settings.show_progress(settings.parse({"data_path": "d"}, ["--progress=false"]))


def test_threads_setting_sets_torch_threads(monkeypatch):
    import torch
    from cmal import distributed
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    distributed.setup_device(settings.parse({"data_path": "d"}, ["--device=cpu", "--threads=1"]))
    assert calls == [1]


def test_tools_spell_options_as_train_does(capsys):
    from cmal.tools import check_data
    from cmal.tools import plot_curves
    from cmal.tools import predict
    args = predict.parse_args(["ck.pt", "img.jpg", "--skip_bad_images=true", "--batch_size=2"])
    assert args.skip_bad_images is True and args.batch_size == 2
    for parse, argv in ((predict.parse_args, ["ck.pt", "img.jpg", "--top=3"]),
                        (plot_curves.parse_args, ["run", "--ou=x.png"]),
                        (check_data.main, ["data", "--num=3"])):
        with pytest.raises(SystemExit) as exc:  # no prefix matching anywhere
            parse(argv)
        assert exc.value.code == 2
    # Every option has help text, with its default shown.
    assert check_data_help(capsys).count("(default:") == 4


def check_data_help(capsys):
    from cmal.tools import check_data
    with pytest.raises(SystemExit):
        check_data.main(["--help"])
    return capsys.readouterr().out


def test_test_only_reports_beyond_the_paper_and_writes_a_confusion_matrix(tmp_path, capsys):
    import csv
    import json
    data, out = _tiny_run(tmp_path)
    logged = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["test"]
    capsys.readouterr()
    assert _bare(data, out, "--test_only", f"--resume={out / 'last.pt'}", "--tta_flip") == 0
    printed = capsys.readouterr().out
    report = out / "last_evaluation"
    rows = list(csv.DictReader((report / "per_class.csv").open()))
    assert [r["class"] for r in rows] == ["class_0", "class_1", "class_2"]
    assert [int(r["images"]) for r in rows] == [3, 3, 3]
    matrix = list(csv.reader((report / "confusion.csv").open()))
    counts = [[int(v) for v in row[1:]] for row in matrix[1:]]
    assert sum(map(sum, counts)) == 9
    assert 100 * sum(counts[i][i] for i in range(3)) / 9 == pytest.approx(logged["acc_combined"])
    mean = sum(float(r["accuracy"]) for r in rows) / 3
    assert f"mean per-class (combined) {mean:.2f}%" in printed
    assert "top-5 (combined) 100.00%" in printed  # 3 classes: always within the top 5
    assert "combined with mirror images" in printed and (report / "confusion.png").is_file()
    assert _bare(data, out, "--test_only", f"--resume={out / 'last.pt'}") == 2
    assert "already holds an evaluation report" in capsys.readouterr().err
    assert _bare(data, out, "--test_only", f"--resume={out / 'last.pt'}", "--overwrite") == 0


# ---- bad numbers, empty values and recording settings on resume (#18) ---------------------------
@pytest.mark.parametrize("bad, said", [
    ("--threads=-1", "--threads cannot be negative, got -1"),
    ("--crop_padding=-3", "--crop_padding cannot be negative"),
    ("--head_mid=0", "--head_mid must be positive"),
    ("--head_features=-1", "--head_features must be positive"),
    ("--head_hidden=0", "--head_hidden must be positive"),
    ("--width_factor=0.01", "--width_factor must be at least 1/64"),
    ("--width_factor=nan", "--width_factor must be a finite number"),
    ("--lr=nan", "--lr must be a finite number"),
    ("--backbone_lr=inf", "--backbone_lr must be a finite number"),
    ("--momentum=1", "--momentum must be below 1"),
    ("--seed=99999999999999999999", "--seed must fit in 64 bits"),
    ("--tta_flip", "--tta_flip scores mirror images when evaluating a checkpoint"),
    # Most random crops would be blank padding: a non-finite loss blamed on --lr.
    ("--crop_padding=500", "--crop_padding (500) must be below --image_size (368)"),
])
def test_bad_numbers_are_refused_naming_the_setting(bad, said, capsys):
    with pytest.raises(SystemExit) as exc:
        settings.parse({"data_path": "d"}, [bad])
    assert exc.value.code == 2
    assert said in capsys.readouterr().err


def test_an_empty_setting_is_shown_quoted():
    trained = Settings(data_path="d", weights="").to_dict()
    script = Settings(data_path="d", weights="in21k")  # a dataset script's default
    _, notes = settings.from_checkpoint_for(script, trained, set(), "last.pt")
    assert "weights=''" in notes
    with pytest.raises(settings.SettingsError, match=r"--weights=in21k \(it was trained with ''\)"):
        settings.from_checkpoint_for(script, trained, {"weights"}, "last.pt")


def test_tensorboard_can_be_turned_on_or_off_when_resuming():
    without = Settings(data_path="d").to_dict()
    cfg, _ = settings.from_checkpoint_for(Settings(data_path="d", tensorboard=True), without,
                                          {"tensorboard"}, "last.pt")
    assert cfg.tensorboard
    # Not given: the checkpoint's choice is kept, as for every setting it decides.
    with_tb = Settings(data_path="d", tensorboard=True).to_dict()
    cfg, _ = settings.from_checkpoint_for(Settings(data_path="d"), with_tb, set(), "last.pt")
    assert cfg.tensorboard
    cfg, _ = settings.from_checkpoint_for(Settings(data_path="d"), with_tb, {"tensorboard"},
                                          "last.pt")
    assert not cfg.tensorboard


def test_a_resumed_run_records_tensorboard_from_where_it_resumes(tmp_path):
    event_accumulator = pytest.importorskip(
        "tensorboard.backend.event_processing.event_accumulator",
        reason="tensorboard is in requirements.txt; make setup installs it")
    data, out = _tiny_run(tmp_path)
    assert _bare(data, out, "--resume", "--extend", "--epochs=2", "--tensorboard") == 0
    logs = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    logs.Reload()
    # The checkpoint's last epoch is written again on resume (a kill right after the checkpoint
    # can have lost its events), then the new epochs.
    assert [e.step for e in logs.Scalars("test/acc_combined")] == [1, 2]


@pytest.mark.parametrize("argv, said", [
    (["--data_path=~/data"], "--data_path=~/data starts with ~, which the shell does not expand"),
    (["--output_dir=~/runs/a"], "write --output_dir ~/runs/a (with a space)"),
    (["--output_dir=d/train/run"], "--output_dir=d/train/run lies inside the train split of "
                                   "--data_path=d"),
    (["--output_dir=d/test"], "--output_dir=d/test lies inside the test split"),
    # --output_dir=$OUT with OUT unset: the run would write among the current folder's files.
    (["--output_dir="], "--output_dir is empty (an unset shell variable?)"),
])
def test_paths_a_shell_or_a_typo_makes_wrong_are_refused(argv, said, capsys):
    with pytest.raises(SystemExit) as exc:
        settings.parse({"data_path": "d"}, argv)
    assert exc.value.code == 2 and said in capsys.readouterr().err


def test_an_output_dir_beside_the_splits_is_fine():
    assert settings.parse({"data_path": "d"}, ["--output_dir=d/runs/a"]).output_dir == "d/runs/a"
