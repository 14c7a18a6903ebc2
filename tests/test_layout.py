"""The project's shape: the reference's import names at the top level, the package importable
from any folder, and a root that holds the product and little else."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_reference_import_names_are_the_package_objects():
    import basic_conv
    import model
    import src.models
    import utils
    import cmal.basic_conv
    import cmal.model
    import cmal.tresnet
    import cmal.utils
    assert model.build_cmal is cmal.model.build_cmal and model.CMALNet is cmal.model.CMALNet
    assert utils.highlight_im is cmal.utils.highlight_im
    assert basic_conv.BasicConv is cmal.basic_conv.BasicConv
    assert src.models.TResnetL_V2 is cmal.tresnet.TResnetL_V2


def test_package_imports_from_another_folder(tmp_path):
    # make setup installs the project in editable mode; nothing of the project is on the path here.
    code = ("import cmal.model, cmal.engine, cmal.train, cmal.tools.predict; "
            "print(cmal.model.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()) == ROOT / "cmal" / "model.py"


def test_commands_run_from_another_folder(tmp_path):
    bin_dir = Path(sys.executable).parent
    proc = subprocess.run([str(bin_dir / "cmal-predict"), "--help"], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "CHECKPOINT" in proc.stdout.upper(), proc.stderr


def test_root_holds_the_product():
    scripts = {p.name for p in ROOT.glob("*.py")}
    assert scripts == {"basic_conv.py", "model.py", "utils.py", "train.py",
                       "train_Aircraft_TResNet_L.py", "train_Food11_TResNet_L.py",
                       "train_Stanford_Cars_TResNet_L.py"}
