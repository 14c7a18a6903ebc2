"""cmal.tools.prepare_data on miniature copies of each official layout, built in tmp_path."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from cmal.tools import prepare_data
from cmal.tools.prepare_data import main

ROOT = Path(__file__).resolve().parents[1]


# ---- fake downloads ----------------------------------------------------------------------------

def save_jpeg(path, width=32, height=24, seed=0, banner=False):
    """A small noisy JPEG; with `banner`, its bottom 20 rows are white (the banner), the half
    above them mid grey and the top half dark grey, so that a crop taken elsewhere than at the top
    shows. Grey, because a sharp colour edge blurs at every re-encoding (the colour is stored at
    half resolution) whatever the quality."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 40, (height, width, 3)).astype(np.uint8)
    if banner:
        a[: (height - 20) // 2] += 40
        a[(height - 20) // 2: height - 20] += 140
        a[height - 20:] = 255
    Image.fromarray(a).save(path, quality=90)
    return path


AIRCRAFT = {"train": [("1042824", "707-320"), ("0062765", "F/A-18"), ("0001701", "Cessna 172"),
                      ("0001702", "Cessna 172")],
            "test": [("1042825", "707-320"), ("0062766", "F/A-18"), ("0001703", "Cessna 172")]}


def make_aircraft(root):
    data = root / "fgvc-aircraft-2013b" / "data"
    for k, (image_id, _) in enumerate(AIRCRAFT["train"] + AIRCRAFT["test"]):
        save_jpeg(data / "images" / f"{image_id}.jpg", width=48, height=64, seed=k, banner=True)
    for split, name in (("train", "images_variant_trainval.txt"),
                        ("test", "images_variant_test.txt")):
        (data / name).write_text("".join(f"{i} {v}\n" for i, v in AIRCRAFT[split]))
    (data / "variants.txt").write_text("707-320\nCessna 172\nF/A-18\n")
    return root / "fgvc-aircraft-2013b"


CARS_CLASSES = ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012",
                "smart fortwo Convertible 2012"]


def annotations_struct(labels, with_class=True):
    """The 'annotations' variable of cars_{train,test}_annos*.mat: a 1xN MATLAB struct array
    with fields bbox_x1, bbox_y1, bbox_x2, bbox_y2, class (1-based; absent from the devkit's
    unlabelled cars_test_annos.mat) and fname, every field an array as MATLAB stores it."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + ["class"] * with_class + ["fname"]
    a = np.zeros((1, len(labels)), dtype=[(f, "O") for f in fields])
    for k, (fname, number) in enumerate(labels):
        values = [np.array([[3]], np.uint8), np.array([[4]], np.uint8),
                  np.array([[300]], np.uint16), np.array([[200]], np.uint16)]
        values += [np.array([[number]], np.uint8)] * with_class + [np.array([fname])]
        a[0, k] = tuple(values)
    return a


def make_cars_devkit(root, labels_in_devkit=False):
    """cars_train/, cars_test/, devkit/ and cars_test_annos_withlabels.mat as downloaded."""
    train = [("00001.jpg", 1), ("00002.jpg", 2), ("00003.jpg", 3), ("00004.jpg", 2)]
    test = [("00001.jpg", 2), ("00002.jpg", 1), ("00003.jpg", 3)]
    for folder, labels in (("cars_train", train), ("cars_test", test)):
        for k, (fname, _) in enumerate(labels):
            save_jpeg(root / folder / fname, seed=k)
    devkit = root / "devkit"
    devkit.mkdir(parents=True)
    names = np.empty((1, len(CARS_CLASSES)), dtype=object)
    for k, name in enumerate(CARS_CLASSES):
        names[0, k] = np.array([name])
    sio.savemat(devkit / "cars_meta.mat", {"class_names": names})
    sio.savemat(devkit / "cars_train_annos.mat", {"annotations": annotations_struct(train)})
    sio.savemat(devkit / "cars_test_annos.mat",
                {"annotations": annotations_struct(test, with_class=False)})
    labelled_dir = devkit if labels_in_devkit else root
    sio.savemat(labelled_dir / "cars_test_annos_withlabels.mat",
                {"annotations": annotations_struct(test)})
    return root


def make_cars_folders(root):
    base = root / "car_data" / "car_data"
    for split, count in (("train", 3), ("test", 2)):
        for c, name in enumerate(["Acura TL Sedan 2012", "Ram C-V Cargo Van Minivan 2012"]):
            for k in range(count):
                save_jpeg(base / split / name / f"{split}_{c}{k}.jpg", seed=k)
    (base / "train" / "Acura TL Sedan 2012" / ".DS_Store").write_bytes(b"\0")
    return root


def make_food11_flat(root):
    """The official Food-11: <class index>_<n>.jpg in training/, validation/, evaluation/.
    Validation reuses names of training files, as the real one does."""
    counts = {"training": 3, "validation": 2, "evaluation": 1}
    for folder, count in counts.items():
        for c in range(11):
            for n in range(count):
                save_jpeg(root / folder / f"{c}_{n}.jpg", width=8, height=8, seed=n)
    return root


def make_food11_folders(root):
    for folder, count in {"training": 2, "validation": 1, "evaluation": 1}.items():
        for c, name in enumerate(prepare_data.FOOD11_CLASSES):
            for n in range(count):
                save_jpeg(root / folder / name / f"{c}_{n}.jpg", width=8, height=8, seed=n)
    return root


# ---- helpers -----------------------------------------------------------------------------------

def tree(root):
    """{relative path: sha1 of content} of every file below `root`."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def classes(out, split):
    return sorted(p.name for p in (out / split).iterdir())


def images(out, split):
    return sorted(str(p.relative_to(out / split)) for p in (out / split).rglob("*.jpg"))


def check_layout(out, n_train, n_test, n_classes):
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]
    assert classes(out, "train") == classes(out, "test")
    assert len(classes(out, "train")) == n_classes
    assert (len(images(out, "train")), len(images(out, "test"))) == (n_train, n_test)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- FGVC-Aircraft -----------------------------------------------------------------------------

def test_aircraft_layout_classes_and_summary(tmp_path, capsys):
    src = make_aircraft(tmp_path / "dl")
    before = tree(src)
    code, out_text, _ = run(capsys, "aircraft", src, tmp_path / "out")
    out = tmp_path / "out"
    assert code == 0
    check_layout(out, 4, 3, 3)
    assert classes(out, "train") == ["707-320", "Cessna 172", "F_A-18"]
    assert images(out, "train") == ["707-320/1042824.jpg", "Cessna 172/0001701.jpg",
                                    "Cessna 172/0001702.jpg", "F_A-18/0062765.jpg"]
    assert f"train: 4 images, 3 classes; test: 3 images, 3 classes -> {out}" in out_text
    assert tree(src) == before


@pytest.mark.parametrize("given", ["archive folder", "data folder"])
def test_aircraft_accepts_the_folder_or_its_data_subfolder(tmp_path, capsys, given):
    src = make_aircraft(tmp_path / "dl")
    code, _, _ = run(capsys, "aircraft", src if given == "archive folder" else src / "data",
                     tmp_path / "out")
    assert code == 0
    check_layout(tmp_path / "out", 4, 3, 3)


def test_aircraft_banner_is_cut_off_and_the_top_kept(tmp_path, capsys):
    src = make_aircraft(tmp_path / "dl")
    assert run(capsys, "aircraft", src, tmp_path / "out", "--threads", "2")[0] == 0
    source = src / "data" / "images" / "0062765.jpg"
    result = tmp_path / "out" / "train" / "F_A-18" / "0062765.jpg"
    with Image.open(source) as a, Image.open(result) as b:
        assert b.format == "JPEG"
        assert b.size == (a.width, a.height - 20)
        top = np.asarray(a.convert("RGB"), float)[: a.height - 20]
        kept = np.asarray(b.convert("RGB"), float)
    # The top rows, re-encoded with the source's tables.
    assert np.abs(kept - top).mean() < 1.0
    assert kept.max() < 250  # none of the white banner left
    # A new file: the aircraft source files are never linked.
    assert result.stat().st_ino != source.stat().st_ino
    assert source.stat().st_nlink == 1 and not result.is_symlink()


def test_aircraft_missing_annotation_file_is_refused(tmp_path, capsys):
    src = make_aircraft(tmp_path / "dl")
    (src / "data" / "images_variant_test.txt").unlink()
    code, _, err = run(capsys, "aircraft", src, tmp_path / "out")
    assert code != 0
    assert "images_variant_test.txt" in err and str(src / "data") in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_aircraft_missing_image_is_refused(tmp_path, capsys):
    src = make_aircraft(tmp_path / "dl")
    (src / "data" / "images" / "0001703.jpg").unlink()
    code, _, err = run(capsys, "aircraft", src, tmp_path / "out")
    assert code != 0 and "0001703.jpg" in err and "missing" in err


def test_aircraft_malformed_annotation_line_is_refused(tmp_path, capsys):
    src = make_aircraft(tmp_path / "dl")
    (src / "data" / "images_variant_test.txt").write_text("1042825 707-320\n0062766\n")
    code, _, err = run(capsys, "aircraft", src, tmp_path / "out")
    assert code != 0 and "line 2" in err and "<image id> <variant>" in err


# ---- Stanford Cars -----------------------------------------------------------------------------

def test_fake_cars_devkit_has_the_structure_of_the_real_one(tmp_path):
    """Guards the fixture: loadmat of the real files gives these shapes and types."""
    root = make_cars_devkit(tmp_path / "dl")
    annos = sio.loadmat(root / "devkit" / "cars_train_annos.mat")["annotations"]
    assert annos.shape == (1, 4)
    assert annos.dtype.names == ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    assert annos[0, 0]["class"].shape == (1, 1) and annos[0, 0]["fname"][0] == "00001.jpg"
    names = sio.loadmat(root / "devkit" / "cars_meta.mat")["class_names"]
    assert names.shape == (1, 3) and names.dtype == object
    assert names[0, 1][0] == "Ram C/V Cargo Van Minivan 2012"


@pytest.mark.parametrize("labels_in_devkit", [False, True])
def test_cars_devkit(tmp_path, capsys, labels_in_devkit):
    src = make_cars_devkit(tmp_path / "dl", labels_in_devkit)
    before = tree(src)
    code, out_text, _ = run(capsys, "cars", src, tmp_path / "out")
    out = tmp_path / "out"
    assert code == 0
    check_layout(out, 4, 3, 3)
    assert classes(out, "train") == ["AM General Hummer SUV 2000",
                                     "Ram C_V Cargo Van Minivan 2012",
                                     "smart fortwo Convertible 2012"]
    # class is 1-based: train 00002.jpg and 00004.jpg are class 2, test 00001.jpg too.
    assert images(out, "train")[1:3] == ["Ram C_V Cargo Van Minivan 2012/00002.jpg",
                                         "Ram C_V Cargo Van Minivan 2012/00004.jpg"]
    assert "Ram C_V Cargo Van Minivan 2012/00001.jpg" in images(out, "test")
    assert (out / "test" / "Ram C_V Cargo Van Minivan 2012" / "00001.jpg").read_bytes() == \
        (src / "cars_test" / "00001.jpg").read_bytes()
    assert "train: 4 images, 3 classes; test: 3 images, 3 classes" in out_text
    assert tree(src) == before


def test_cars_devkit_without_test_labels_is_refused(tmp_path, capsys):
    src = make_cars_devkit(tmp_path / "dl")
    (src / "cars_test_annos_withlabels.mat").unlink()
    code, _, err = run(capsys, "cars", src, tmp_path / "out")
    assert code != 0
    assert "cars_test_annos_withlabels.mat" in err and str(src) in err
    assert not (tmp_path / "out").exists()


def test_cars_unlabelled_test_annotations_are_refused(tmp_path, capsys):
    # Someone renaming the devkit's cars_test_annos.mat, which has no 'class' field.
    src = make_cars_devkit(tmp_path / "dl")
    os.replace(src / "devkit" / "cars_test_annos.mat", src / "cars_test_annos_withlabels.mat")
    code, _, err = run(capsys, "cars", src, tmp_path / "out")
    assert code != 0 and "'class'" in err


def test_cars_missing_devkit_file_is_refused(tmp_path, capsys):
    src = make_cars_devkit(tmp_path / "dl")
    (src / "devkit" / "cars_meta.mat").unlink()
    code, _, err = run(capsys, "cars", src, tmp_path / "out")
    assert code != 0 and str(src / "devkit" / "cars_meta.mat") in err


def test_cars_class_folders_mirror_is_taken_as_is(tmp_path, capsys):
    src = make_cars_folders(tmp_path / "dl")
    code, _, _ = run(capsys, "cars", src, tmp_path / "out")
    out = tmp_path / "out"
    assert code == 0
    check_layout(out, 6, 4, 2)
    assert classes(out, "test") == ["Acura TL Sedan 2012", "Ram C-V Cargo Van Minivan 2012"]
    assert "Acura TL Sedan 2012/train_01.jpg" in images(out, "train")
    assert not (out / "train" / "Acura TL Sedan 2012" / ".DS_Store").exists()


# ---- Food-11 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("where, n_train, n_test", [(None, 55, 11), ("train", 55, 11),
                                                    ("test", 33, 33), ("skip", 33, 11)])
def test_food11_validation_option(tmp_path, capsys, where, n_train, n_test):
    src = make_food11_flat(tmp_path / "dl")
    extra = [] if where is None else ["--validation_to", where]
    code, _, _ = run(capsys, "food11", src, tmp_path / "out", *extra)
    out = tmp_path / "out"
    assert code == 0
    check_layout(out, n_train, n_test, 11)
    assert classes(out, "train") == sorted(prepare_data.FOOD11_CLASSES)
    validation_split = {None: "train", "train": "train", "test": "test"}.get(where)
    if validation_split:
        # training/0_0.jpg and validation/0_0.jpg both kept, under different names.
        names = images(out, validation_split)
        assert "Bread/validation_0_0.jpg" in names and "Vegetable-Fruit/10_0.jpg" in names
        assert (out / validation_split / "Bread" / "validation_0_0.jpg").samefile(
            src / "validation" / "0_0.jpg")
    else:
        assert not any("validation" in n for split in ("train", "test")
                       for n in images(out, split))


def test_food11_class_folder_variant(tmp_path, capsys):
    make_food11_folders(tmp_path / "dl" / "Food-11")
    # Given the folder holding the archive's Food-11/ folder.
    code, out_text, _ = run(capsys, "food11", tmp_path / "dl", tmp_path / "out")
    out = tmp_path / "out"
    assert code == 0
    check_layout(out, 33, 11, 11)
    assert "Dairy product/validation_1_0.jpg" in images(out, "train")
    assert "train: 33 images, 11 classes; test: 11 images, 11 classes" in out_text


def test_food11_badly_named_image_is_refused(tmp_path, capsys):
    src = make_food11_flat(tmp_path / "dl")
    save_jpeg(src / "evaluation" / "11_0.jpg")  # there is no class 11
    code, _, err = run(capsys, "food11", src, tmp_path / "out")
    assert code != 0 and "11_0.jpg" in err


def test_food11_missing_validation_suggests_skipping_it(tmp_path, capsys):
    src = make_food11_flat(tmp_path / "dl")
    for f in (src / "validation").iterdir():
        f.unlink()
    (src / "validation").rmdir()
    code, _, err = run(capsys, "food11", src, tmp_path / "out")
    assert code != 0 and "validation" in err and "--validation_to skip" in err
    assert run(capsys, "food11", src, tmp_path / "out", "--validation_to", "skip")[0] == 0


# ---- links, copies and the source --------------------------------------------------------------

def test_default_hard_links_leave_the_source_untouched(tmp_path, capsys):
    src = make_food11_flat(tmp_path / "dl")
    before = tree(src)
    code, out_text, _ = run(capsys, "food11", src, tmp_path / "out")
    assert code == 0 and "hard links" in out_text
    result = tmp_path / "out" / "train" / "Egg" / "3_0.jpg"
    assert result.stat().st_ino == (src / "training" / "3_0.jpg").stat().st_ino
    assert tree(src) == before


def test_copy_shares_no_inode_with_the_source(tmp_path, capsys):
    src = make_cars_devkit(tmp_path / "dl")
    before = tree(src)
    code, out_text, _ = run(capsys, "cars", src, tmp_path / "out", "--copy")
    assert code == 0 and "copies" in out_text
    source_inodes = {p.stat().st_ino for p in src.rglob("*") if p.is_file()}
    outputs = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert len(outputs) == 7
    assert not any(p.is_symlink() or p.stat().st_ino in source_inodes for p in outputs)
    assert all(p.stat().st_nlink == 1 for p in src.rglob("*") if p.is_file())
    assert tree(src) == before


def test_falls_back_to_symlinks_then_copies(tmp_path, capsys, monkeypatch):
    def no_hard_links(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    src = make_cars_folders(tmp_path / "dl")
    monkeypatch.setattr(os, "link", no_hard_links)
    code, out_text, _ = run(capsys, "cars", src, tmp_path / "sym")
    assert code == 0 and "10 symbolic links" in out_text
    linked = tmp_path / "sym" / "test" / "Acura TL Sedan 2012" / "test_00.jpg"
    assert linked.is_symlink() and os.path.isabs(os.readlink(linked))
    assert linked.samefile(src / "car_data" / "car_data" / "test" / "Acura TL Sedan 2012"
                           / "test_00.jpg")

    monkeypatch.setattr(os, "symlink", no_hard_links)
    code, out_text, _ = run(capsys, "cars", src, tmp_path / "copied")
    assert code == 0 and "10 copies" in out_text
    assert not any(p.is_symlink() for p in (tmp_path / "copied").rglob("*"))


# ---- refusals ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dataset, expected", [
    ("aircraft", "images_variant_trainval.txt"),
    ("cars", "cars_train_annos.mat"),
    ("food11", "evaluation/"),
])
def test_unrecognised_layout_is_refused(tmp_path, capsys, dataset, expected):
    src = tmp_path / "dl"
    save_jpeg(src / "photos" / "a.jpg")
    code, _, err = run(capsys, dataset, src, tmp_path / "out")
    assert code != 0
    assert "does not look like" in err and expected in err and f"Looked in: {src}" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_non_empty_destination_is_refused(tmp_path, capsys):
    src = make_food11_flat(tmp_path / "dl")
    out = tmp_path / "out"
    (out / "train" / "other").mkdir(parents=True)
    code, _, err = run(capsys, "food11", src, out)
    assert code != 0 and "not an empty folder" in err
    assert [p.name for p in out.rglob("*")] == ["train", "other"]


def test_empty_destination_is_accepted(tmp_path, capsys):
    src = make_food11_flat(tmp_path / "dl")
    (tmp_path / "out").mkdir()
    assert run(capsys, "food11", src, tmp_path / "out")[0] == 0
    check_layout(tmp_path / "out", 55, 11, 11)


def test_destination_inside_the_source_is_refused(tmp_path, capsys):
    src = make_food11_flat(tmp_path / "dl")
    code, _, err = run(capsys, "food11", src, src / "prepared")
    assert code != 0 and "inside the source" in err
    assert not (src / "prepared").exists()


def test_missing_source_is_refused(tmp_path, capsys):
    code, _, err = run(capsys, "cars", tmp_path / "nowhere", tmp_path / "out")
    assert code != 0 and "does not exist" in err


def test_classes_differing_between_train_and_test_are_refused(tmp_path, capsys):
    src = make_cars_folders(tmp_path / "dl")
    save_jpeg(src / "car_data" / "car_data" / "train" / "Only Train 2000" / "x.jpg")
    code, _, err = run(capsys, "cars", src, tmp_path / "out")
    assert code != 0 and "only in train: Only Train 2000" in err
    assert not (tmp_path / "out").exists()


def test_failure_while_writing_leaves_no_output(tmp_path, capsys):
    src = make_aircraft(tmp_path / "dl")
    (src / "data" / "images" / "0001702.jpg").write_bytes(b"not a jpeg")
    code, _, err = run(capsys, "aircraft", src, tmp_path / "out", "--threads", "1")
    assert code != 0 and "0001702.jpg" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl"]  # no OUT, no partial folder


def test_folder_names_are_safe_readable_and_unique():
    names = prepare_data.folder_names(["F/A-18", "F_A-18", "Cessna 172", ".hidden", "a\\b"])
    assert names["F/A-18"] == "F_A-18" or names["F_A-18"] == "F_A-18"
    assert len(set(names.values())) == 5
    assert names["Cessna 172"] == "Cessna 172"
    assert names[".hidden"] == "hidden" and names["a\\b"] == "a_b"
    assert not any("/" in v for v in names.values())


def test_command_line_help_and_user_error_without_traceback(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "cmal.tools.prepare_data", *map(str, args)],
                              capture_output=True, text=True, cwd=tmp_path)

    helped = cli("--help")
    assert helped.returncode == 0
    assert all(word in helped.stdout for word in ("aircraft", "cars", "food11", "--copy",
                                                   "--validation_to", "train/<class>"))
    (tmp_path / "empty").mkdir()
    refused = cli("aircraft", tmp_path / "empty", tmp_path / "out")
    assert refused.returncode == 2 and refused.stderr.startswith("error: ")
    assert "does not look like FGVC-Aircraft" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_food11_validation_to_val_feeds_val_split_folder(tmp_path, capsys):
    from cmal.data import check_layout as scan
    src = make_food11_flat(tmp_path / "dl")
    code, out_text, _ = run(capsys, "food11", src, tmp_path / "out", "--validation_to", "val")
    out = tmp_path / "out"
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["test", "train", "val"]
    assert classes(out, "val") == classes(out, "train")
    assert (len(images(out, "train")), len(images(out, "val")), len(images(out, "test"))) == \
        (33, 22, 11)
    assert "Bread/validation_0_0.jpg" in images(out, "val")
    assert len(scan(out, with_val=True)[1]["val"]) == 22  # what --val_split=folder reads
