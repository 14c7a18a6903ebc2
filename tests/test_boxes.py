"""cmal.datasets.boxes: the boxes.csv format, written and read back, its errors, and the light
imports that let the training read it."""
import subprocess
import sys
from pathlib import Path

import pytest

from cmal.datasets.boxes import BoxesError, read_boxes, write_boxes

ROOT = Path(__file__).resolve().parents[1]


def test_boxes_file_round_trip(tmp_path):
    written = {Path("train", "Ram C_V, Cargo Van", "00001.jpg"): (2, 3, 30, 20),
               Path("test", "x", "a b.png"): (0.5, 1.25, 7, 9.75)}
    path = tmp_path / "boxes.csv"
    write_boxes(path, written)
    lines = path.read_text().splitlines()
    assert lines[0] == "split,class,file,x0,y0,x1,y1"
    assert 'train,"Ram C_V, Cargo Van",00001.jpg,2,3,30,20' in lines
    assert "test,x,a b.png,0.5,1.25,7,9.75" in lines
    assert read_boxes(path) == written


@pytest.mark.parametrize("content, message", [
    ("split,class,file,x,y,w,h\n", "the first line must be split,class,file,x0,y0,x1,y1"),
    ("train,a,b.jpg,1,2,3\n", "line 2: expected 7 fields, got 6"),
    ("train,a,b.jpg,1,2,x,4\n", "line 2: coordinates must be numbers"),
    ("train,a,b.jpg,5,2,5,4\n", "line 2: x1 must exceed x0"),
    ("train,a,b.jpg,-1,2,5,4\n", "line 2: x0 and y0 must be 0 or more"),
    ("train,,b.jpg,1,2,5,4\n", "line 2: split, class and file must not be empty"),
    ("train,a,b.jpg,1,2,5,4\ntrain,a,b.jpg,1,2,5,4\n", "line 3: a second box for train/a/b.jpg"),
])
def test_boxes_file_errors_name_the_line(tmp_path, content, message):
    path = tmp_path / "boxes.csv"
    header = "" if content.startswith("split") else "split,class,file,x0,y0,x1,y1\n"
    path.write_text(header + content)
    with pytest.raises(BoxesError) as caught:
        read_boxes(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


@pytest.mark.parametrize("image, box, message", [
    (Path("train", "a", "b.jpg"), (3, 0, 3, 5), "x1 must exceed x0"),
    (Path("b.jpg"), (0, 0, 3, 5), "split/class/file"),
    (Path("train", "a", "b.jpg"), (0, 0, float("nan"), 5), "four finite numbers"),
])
def test_write_boxes_refuses_what_read_boxes_would(tmp_path, image, box, message):
    with pytest.raises(BoxesError, match=message):
        write_boxes(tmp_path / "boxes.csv", {image: box})
    assert not (tmp_path / "boxes.csv").exists()


def imported_after(statement):
    """The modules of interest that `statement` leaves in sys.modules of a fresh interpreter."""
    watched = ("numpy", "PIL", "scipy", "pyarrow", "torch", "cmal.tools")
    code = (f"import sys; {statement}; "
            f"print(' '.join(m for m in {watched!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=ROOT, check=True)
    return result.stdout.split()


def test_boxes_module_imports_nothing_heavy():
    # The training reads boxes.csv: reading it must not pull in the converters' dependencies.
    assert imported_after("import cmal.datasets.boxes") == []


def test_datasets_modules_do_not_import_the_command_line():
    modules = ("records", "boxes", "sources", "cars", "aircraft", "food11", "cub", "parquet",
               "writer")
    imported = imported_after("; ".join(f"import cmal.datasets.{m}" for m in modules))
    assert "cmal.tools" not in imported
    # scipy and pyarrow are imported only when a .mat or parquet file is read.
    assert "scipy" not in imported and "pyarrow" not in imported
