"""Settings: one schema for the dataset scripts, the command line and checkpoints."""
import subprocess
import sys
from pathlib import Path

import pytest

import settings
from settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_then_block_then_command_line():
    cfg = settings.parse({"data_path": "d", "epochs": 7, "layers": "1,2,3,4"},
                         ["--epochs=9", "--compile", "--progress=false"])
    assert (cfg.data_path, cfg.epochs, cfg.layers) == ("d", 9, (1, 2, 3, 4))
    assert cfg.compile is True and cfg.progress is False and cfg.lr == 0.002


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
