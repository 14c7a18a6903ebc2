"""cmal.tools.prepare_data (and the cmal.datasets modules it runs) on miniature copies of each
official layout, built in tmp_path; the boxes.csv format alone is tested in test_boxes.py."""
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from cmal.datasets.boxes import box_from_corners, box_from_size, read_boxes
from cmal.datasets.food11 import FOOD11_CLASSES
from cmal.datasets.parquet import class_namer
from cmal.datasets.sources import folder_name, folder_names
from cmal.tools.prepare_data import main

ROOT = Path(__file__).resolve().parents[1]


# ---- fake downloads ----------------------------------------------------------------------------

def jpeg_bytes(width=32, height=24, seed=0, banner=False):
    """A small noisy JPEG; with `banner`, its bottom 20 rows are white (the banner), the half
    above them mid grey and the top half dark grey, so that a crop taken elsewhere than at the top
    shows. Grey, because a sharp colour edge blurs at every re-encoding (the colour is stored at
    half resolution) whatever the quality."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 40, (height, width, 3)).astype(np.uint8)
    if banner:
        a[: (height - 20) // 2] += 40
        a[(height - 20) // 2: height - 20] += 140
        a[height - 20:] = 255
    buffer = io.BytesIO()
    Image.fromarray(a).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def save_jpeg(path, width=32, height=24, seed=0, banner=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(jpeg_bytes(width, height, seed, banner))
    return path


AIRCRAFT = {"train": [("1042824", "707-320"), ("0062765", "F/A-18"), ("0001701", "Cessna 172"),
                      ("0001702", "Cessna 172")],
            "test": [("1042825", "707-320"), ("0062766", "F/A-18"), ("0001703", "Cessna 172")]}


# 1-based inclusive xmin ymin xmax ymax; the images are 48 x 64 with the banner in rows 45-64, so
# the box of 0062765 (rows 10-60) reaches into the banner and is cut at row 44.
AIRCRAFT_BOXES = {"1042824": (1, 1, 48, 44), "0062765": (5, 10, 30, 60), "0001701": (2, 3, 40, 20),
                  "0001702": (1, 1, 10, 10), "1042825": (3, 4, 20, 30), "0062766": (1, 2, 3, 4),
                  "0001703": (7, 8, 9, 10)}


def make_aircraft(root):
    data = root / "fgvc-aircraft-2013b" / "data"
    for k, (image_id, _) in enumerate(AIRCRAFT["train"] + AIRCRAFT["test"]):
        save_jpeg(data / "images" / f"{image_id}.jpg", width=48, height=64, seed=k, banner=True)
    for split, name in (("train", "images_variant_trainval.txt"),
                        ("test", "images_variant_test.txt")):
        (data / name).write_text("".join(f"{i} {v}\n" for i, v in AIRCRAFT[split]))
    (data / "variants.txt").write_text("707-320\nCessna 172\nF/A-18\n")
    (data / "images_box.txt").write_text("".join(f"{i} {xmin} {ymin} {xmax} {ymax}\n"
                                                 for i, (xmin, ymin, xmax, ymax) in
                                                 AIRCRAFT_BOXES.items()))
    return root / "fgvc-aircraft-2013b"


CARS_CLASSES = ["AM General Hummer SUV 2000", "Ram C/V Cargo Van Minivan 2012",
                "smart fortwo Convertible 2012"]


CARS_TRAIN = [("00001.jpg", 1), ("00002.jpg", 2), ("00003.jpg", 3), ("00004.jpg", 2)]
CARS_TEST = [("00001.jpg", 2), ("00002.jpg", 1), ("00003.jpg", 3)]


def cars_bbox(k):
    """The (bbox_x1, bbox_y1, bbox_x2, bbox_y2) of the k-th annotation of a fake: 1-based."""
    return 3 + k, 4 + k, 30 + k, 20 + k


def struct_array(fields, records):
    """A 1xN MATLAB struct array as scipy.io.savemat writes it, every field an array as MATLAB
    stores it (numbers as 1x1 arrays, text as 1-element arrays)."""
    a = np.zeros((1, len(records)), dtype=[(f, "O") for f in fields])
    for k, record in enumerate(records):
        a[0, k] = tuple(np.array([value]) if isinstance(value, str) else
                        np.array([[value]], np.uint16) for value in record)
    return a


def annotations_struct(labels, with_class=True):
    """The 'annotations' variable of cars_{train,test}_annos*.mat: a 1xN MATLAB struct array
    with fields bbox_x1, bbox_y1, bbox_x2, bbox_y2, class (1-based; absent from the devkit's
    unlabelled cars_test_annos.mat) and fname."""
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2"] + ["class"] * with_class + ["fname"]
    return struct_array(fields, [cars_bbox(k) + (number,) * with_class + (fname,)
                                 for k, (fname, number) in enumerate(labels)])


def class_names_cell(names):
    """'class_names' of cars_meta.mat and cars_annos.mat: a 1xN cell array of text."""
    cell = np.empty((1, len(names)), dtype=object)
    for k, name in enumerate(names):
        cell[0, k] = np.array([name])
    return cell


def write_cars_devkit(devkit):
    """cars_meta.mat, cars_train_annos.mat and the unlabelled cars_test_annos.mat."""
    devkit.mkdir(parents=True)
    sio.savemat(devkit / "cars_meta.mat", {"class_names": class_names_cell(CARS_CLASSES)})
    sio.savemat(devkit / "cars_train_annos.mat", {"annotations": annotations_struct(CARS_TRAIN)})
    sio.savemat(devkit / "cars_test_annos.mat",
                {"annotations": annotations_struct(CARS_TEST, with_class=False)})


def write_cars_test_labels(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.savemat(path, {"annotations": annotations_struct(CARS_TEST)})
    return path


def save_cars_images(folder, labels):
    for k, (fname, _) in enumerate(labels):
        save_jpeg(folder / fname, seed=k)


def make_cars_devkit(root, labels_in_devkit=False):
    """cars_train/, cars_test/, devkit/ and cars_test_annos_withlabels.mat as downloaded."""
    save_cars_images(root / "cars_train", CARS_TRAIN)
    save_cars_images(root / "cars_test", CARS_TEST)
    write_cars_devkit(root / "devkit")
    labelled_dir = root / "devkit" if labels_in_devkit else root
    write_cars_test_labels(labelled_dir / "cars_test_annos_withlabels.mat")
    return root


def make_cars_kaggle(root):
    """Kaggle's "Stanford Cars Dataset": each archive folder nested in one of the same name, the
    devkit in car_devkit/, and no test labels."""
    save_cars_images(root / "cars_train" / "cars_train", CARS_TRAIN)
    save_cars_images(root / "cars_test" / "cars_test", CARS_TEST)
    write_cars_devkit(root / "car_devkit" / "devkit")
    return root


# relative_im_path, 1-based class, test flag: car_ims/ numbers both splits in one sequence.
CARS_ALL = [(f"car_ims/{n:06d}.jpg", number, test)
            for n, (number, test) in enumerate([(1, 0), (1, 1), (2, 0), (2, 1), (3, 0), (3, 1),
                                                (3, 0)], 1)]


def make_cars_images(root):
    """car_ims/ and cars_annos.mat: fields relative_im_path, bbox_x1, bbox_y1, bbox_x2,
    bbox_y2, class, test, and the class names in the same file."""
    for k, (relative, _, _) in enumerate(CARS_ALL):
        save_jpeg(root / relative, seed=k)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    records = [(relative,) + cars_bbox(k) + (number, test)
               for k, (relative, number, test) in enumerate(CARS_ALL)]
    sio.savemat(root / "cars_annos.mat", {"annotations": struct_array(fields, records),
                                          "class_names": class_names_cell(CARS_CLASSES)})
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
        for c, name in enumerate(FOOD11_CLASSES):
            for n in range(count):
                save_jpeg(root / folder / name / f"{c}_{n}.jpg", width=8, height=8, seed=n)
    return root


CUB_CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]


def make_cub(root):
    """CUB_200_2011/ as extracted: images/<class>/<image>, the id tables and bounding_boxes.txt
    (x y width height, decimals). Image 1 is a PNG, dark but for a bright block that is exactly
    its box, so that the box convention can be seen in the pixels."""
    cub = root / "CUB_200_2011"
    images, split, labels, boxes = [], [], [], []
    for c, name in enumerate(CUB_CLASSES):
        for n, is_training in enumerate((1, 1, 0)):
            image_id = len(images) + 1
            stem = f"{name.split('.')[1]}_{n + 1:04d}_{100 + image_id}"
            path = f"{name}/{stem}.{'png' if image_id == 1 else 'jpg'}"
            images.append(f"{image_id} {path}")
            split.append(f"{image_id} {is_training}")
            labels.append(f"{image_id} {c + 1}")
            boxes.append(f"{image_id} {5.0 + n} {3.0} {10.0} {8.5 + c}")
            if image_id == 1:
                a = np.full((24, 32, 3), 20, np.uint8)
                a[3:11, 5:15] = 230  # rows 3-10, columns 5-14: x 5, y 3, width 10, height 8
                (cub / "images" / name).mkdir(parents=True)
                Image.fromarray(a).save(cub / "images" / path)
            else:
                save_jpeg(cub / "images" / path, seed=image_id)
    boxes[0] = "1 5.0 3.0 10.0 8.0"
    for file_name, lines in (("images.txt", images), ("train_test_split.txt", split),
                             ("image_class_labels.txt", labels), ("bounding_boxes.txt", boxes),
                             ("classes.txt", [f"{c + 1} {n}" for c, n in enumerate(CUB_CLASSES)])):
        (cub / file_name).write_text("\n".join(lines) + "\n")
    return cub


def make_food11_unlabelled(root):
    """A Food-11 copy whose evaluation images are numbered without a class index."""
    make_food11_flat(root)
    for f in (root / "evaluation").iterdir():
        f.unlink()
    for n in range(4):
        save_jpeg(root / "evaluation" / f"{n:04d}.jpg", width=8, height=8, seed=n)
    return root


def save_parquet(path, columns, features=None):
    """A parquet file of `columns` ({name: values}); `features`, HuggingFace's description of
    the columns, goes in the schema metadata under b"huggingface" as the datasets library
    writes it. An image value is a struct {bytes, path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    table = pa.table(columns)
    if features is not None:
        table = table.replace_schema_metadata(
            {"huggingface": json.dumps({"info": {"features": features}})})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def hf_image_label_features(names, label="label"):
    return {"image": {"_type": "Image"},
            label: {"names": names, "_type": "ClassLabel"}}


# (split file, [(label, image path)]) of a fake Stanford Cars export
CARS_PARQUET = {"train-00000-of-00001.parquet": [(0, "00001.jpg"), (1, "00002.jpg"),
                                                 (2, "00003.jpg"), (1, "00004.jpg")],
                "test-00000-of-00001.parquet": [(1, "00001.jpg"), (0, "00002.jpg"),
                                                (2, "00003.jpg")]}


def make_cars_parquet(root, features=True, test_labels=None):
    for k, (file_name, rows) in enumerate(CARS_PARQUET.items()):
        labels = [label for label, _ in rows]
        if file_name.startswith("test") and test_labels is not None:
            labels = test_labels
        images = [{"bytes": jpeg_bytes(seed=10 * k + n), "path": image_path}
                  for n, (_, image_path) in enumerate(rows)]
        save_parquet(root / file_name, {"image": images, "label": labels},
                     hf_image_label_features(CARS_CLASSES) if features else None)
    return root


AIRCRAFT_FAMILIES = ["Boeing 707", "Cessna 172", "F/A-18"]
AIRCRAFT_VARIANTS = ["707-320", "Cessna 172", "F/A-18"]


def make_aircraft_parquet(root):
    """data/{train,validation,test}-*.parquet with columns image, family and variant, both
    ClassLabels (no 'label' column), images with the 20-pixel banner and no recorded path."""
    features = {"image": {"_type": "Image"},
                "family": {"names": AIRCRAFT_FAMILIES, "_type": "ClassLabel"},
                "variant": {"names": AIRCRAFT_VARIANTS, "_type": "ClassLabel"}}
    for split, variants in (("train", [0, 1, 2]), ("validation", [0, 2]), ("test", [0, 1, 2])):
        images = [{"bytes": jpeg_bytes(48, 64, seed=n, banner=True), "path": None}
                  for n in range(len(variants))]
        save_parquet(root / "data" / f"{split}-00000-of-00001-5a1b2c.parquet",
                     {"image": images, "family": variants, "variant": variants}, features)
    return root


# ---- helpers -----------------------------------------------------------------------------------

def tree(root):
    """{relative path: sha1 of content} of every file below `root`."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def classes(out, split):
    return sorted(p.name for p in (out / split).iterdir())


def images(out, split):
    return sorted(str(p.relative_to(out / split)) for p in (out / split).rglob("*")
                  if p.suffix in (".jpg", ".png"))


def check_layout(out, n_train, n_test, n_classes, boxes=False):
    assert sorted(p.name for p in out.iterdir()) == ["boxes.csv"] * boxes + ["test", "train"]
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
    check_layout(out, 4, 3, 3, boxes=True)
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
    check_layout(tmp_path / "out", 4, 3, 3, boxes=True)


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


def test_aircraft_boxes_are_converted_and_clipped_to_the_image_left(tmp_path, capsys):
    src = make_aircraft(tmp_path / "dl")
    code, out_text, _ = run(capsys, "aircraft", src, tmp_path / "out")
    out = tmp_path / "out"
    assert code == 0 and f"boxes: 7 images -> {out / 'boxes.csv'}" in out_text
    boxes = read_boxes(out / "boxes.csv")
    assert len(boxes) == 7
    # 1-based inclusive columns 1-48, rows 1-44: the whole image left once the banner is cut.
    assert boxes[Path("train", "707-320", "1042824.jpg")] == (0, 0, 48, 44)
    assert boxes[Path("test", "Cessna 172", "0001703.jpg")] == (6, 7, 9, 10)
    # Rows 10-60 of a 64-row image whose last 20 rows are cut: rows 9 to 43 (0-based) are left.
    assert boxes[Path("train", "F_A-18", "0062765.jpg")] == (4, 9, 30, 44)
    for image, box in boxes.items():
        with Image.open(out / image) as img:
            assert box.x1 <= img.width and box.y1 <= img.height


def test_aircraft_box_that_is_empty_is_left_out_with_a_note(tmp_path, capsys):
    src = make_aircraft(tmp_path / "dl")
    boxes_txt = src / "data" / "images_box.txt"
    boxes_txt.write_text(boxes_txt.read_text().replace("0001703 7 8 9 10", "0001703 9 8 7 10"))
    code, out_text, _ = run(capsys, "aircraft", src, tmp_path / "out")
    assert code == 0 and "note: 1 boxes are left out of boxes.csv" in out_text
    assert "0001703.jpg" in out_text
    boxes = read_boxes(tmp_path / "out" / "boxes.csv")
    assert len(boxes) == 6 and Path("test", "Cessna 172", "0001703.jpg") not in boxes


def test_aircraft_malformed_box_line_is_refused(tmp_path, capsys):
    src = make_aircraft(tmp_path / "dl")
    (src / "data" / "images_box.txt").write_text("1042824 1 1 48 44\n0062765 5 ten 30 60\n")
    code, _, err = run(capsys, "aircraft", src, tmp_path / "out")
    assert code != 0 and "images_box.txt, line 2" in err and "expected numbers" in err


def test_aircraft_parquet_export(tmp_path, capsys):
    src = make_aircraft_parquet(tmp_path / "dl")
    code, out_text, _ = run(capsys, "aircraft", src, tmp_path / "out")
    out = tmp_path / "out"
    assert code == 0
    check_layout(out, 5, 3, 3)  # validation -> train: FGVC-Aircraft's trainval
    # The class is the variant column (100 classes in the real one), not the family.
    assert classes(out, "train") == ["707-320", "Cessna 172", "F_A-18"]
    # No recorded path: named after the split and row, with the format's extension.
    assert images(out, "test") == ["707-320/test_000000.jpg", "Cessna 172/test_000001.jpg",
                                   "F_A-18/test_000002.jpg"]
    assert "F_A-18/train_000004.jpg" in images(out, "train")  # validation rows follow train's
    with Image.open(out / "test" / "Cessna 172" / "test_000001.jpg") as img:
        assert img.size == (48, 44)  # the banner cut off, as from the archive
        assert np.asarray(img).max() < 250
    assert "8 new files (banner cut off)" in out_text


@pytest.mark.parametrize("option, n_train, expected", [
    (["--validation_to", "skip"], 3, ["707-320", "Cessna 172", "F_A-18"]),
    (["--label_column", "family"], 5, ["Boeing 707", "Cessna 172", "F_A-18"]),
])
def test_aircraft_parquet_options(tmp_path, capsys, option, n_train, expected):
    src = make_aircraft_parquet(tmp_path / "dl")
    code, _, _ = run(capsys, "aircraft", src, tmp_path / "out", *option)
    assert code == 0
    check_layout(tmp_path / "out", n_train, 3, 3)
    assert classes(tmp_path / "out", "test") == expected


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
    check_layout(out, 4, 3, 3, boxes=True)
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
    boxes = read_boxes(out / "boxes.csv")
    assert len(boxes) == 7
    # 1-based inclusive bbox_x1..bbox_y2 (6, 7, 33, 23) of the 4th train annotation.
    assert boxes[Path("train", "Ram C_V Cargo Van Minivan 2012", "00004.jpg")] == (5, 6, 33, 23)
    assert boxes[Path("test", "AM General Hummer SUV 2000", "00002.jpg")] == (3, 4, 31, 21)


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


def test_cars_kaggle_layout_names_the_missing_test_labels_and_where_they_are(tmp_path, capsys):
    src = make_cars_kaggle(tmp_path / "dl")
    code, _, err = run(capsys, "cars", src, tmp_path / "out")
    assert code == 2 and "Traceback" not in err
    assert "missing cars_test_annos_withlabels.mat" in err
    assert str(src / "car_devkit" / "devkit") in err
    assert "Kaggle" in err and "jessicali9530/stanford-cars-dataset" in err
    assert "pytorch/vision#7545" in err and "--test_annos=FILE" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["devkit", "top", "kaggle copy name", "option"])
def test_cars_kaggle_layout_with_the_test_labels_added(tmp_path, capsys, where):
    src = make_cars_kaggle(tmp_path / "dl")
    name = "cars_test_annos_withlabels.mat"
    labels = write_cars_test_labels({
        "devkit": src / "car_devkit" / "devkit" / name,
        "top": src / name,
        "kaggle copy name": src / "cars_test_annos_withlabels (1).mat",
        "option": tmp_path / "elsewhere" / "test_labels.mat"}[where])
    extra = ["--test_annos", labels] if where == "option" else []
    code, _, _ = run(capsys, "cars", src, tmp_path / "out", *extra)
    out = tmp_path / "out"
    assert code == 0
    check_layout(out, 4, 3, 3, boxes=True)
    assert (out / "test" / "Ram C_V Cargo Van Minivan 2012" / "00001.jpg").samefile(
        src / "cars_test" / "cars_test" / "00001.jpg")


def test_cars_test_annos_option_naming_a_missing_file_is_refused(tmp_path, capsys):
    src = make_cars_kaggle(tmp_path / "dl")
    code, _, err = run(capsys, "cars", src, tmp_path / "out", "--test_annos", tmp_path / "no.mat")
    assert code == 2 and str(tmp_path / "no.mat") in err and "--test_annos" in err


def test_cars_torchvision_root(tmp_path, capsys):
    from torchvision.datasets import StanfordCars
    root = tmp_path / "torchvision"
    make_cars_devkit(root / "stanford_cars")
    code, _, _ = run(capsys, "cars", root, tmp_path / "out")
    out = tmp_path / "out"
    assert code == 0
    check_layout(out, 4, 3, 3, boxes=True)
    # The fake is what torchvision reads, and each image lands in torchvision's class.
    for split in ("train", "test"):
        dataset = StanfordCars(root, split=split)
        assert dataset.classes == CARS_CLASSES
        for path, target in dataset._samples:
            folder = folder_name(CARS_CLASSES[target])
            assert (out / split / folder / Path(path).name).samefile(path)


def test_cars_car_ims_with_cars_annos(tmp_path, capsys):
    src = make_cars_images(tmp_path / "dl")
    code, _, _ = run(capsys, "cars", src, tmp_path / "out")
    out = tmp_path / "out"
    assert code == 0
    check_layout(out, 4, 3, 3, boxes=True)
    assert images(out, "train") == ["AM General Hummer SUV 2000/000001.jpg",
                                    "Ram C_V Cargo Van Minivan 2012/000003.jpg",
                                    "smart fortwo Convertible 2012/000005.jpg",
                                    "smart fortwo Convertible 2012/000007.jpg"]
    assert images(out, "test") == ["AM General Hummer SUV 2000/000002.jpg",
                                   "Ram C_V Cargo Van Minivan 2012/000004.jpg",
                                   "smart fortwo Convertible 2012/000006.jpg"]
    boxes = read_boxes(out / "boxes.csv")
    assert len(boxes) == 7
    assert boxes[Path("test", "Ram C_V Cargo Van Minivan 2012", "000004.jpg")] == (5, 6, 33, 23)


@pytest.mark.parametrize("removed, expected", [("cars_annos.mat", "missing cars_annos.mat"),
                                               ("car_ims", "car_ims")])
def test_cars_car_ims_layout_missing_half_is_refused(tmp_path, capsys, removed, expected):
    src = make_cars_images(tmp_path / "dl")
    shutil.rmtree(src / removed) if removed == "car_ims" else (src / removed).unlink()
    code, _, err = run(capsys, "cars", src, tmp_path / "out")
    assert code == 2 and expected in err and "Traceback" not in err


def test_cars_test_annos_option_is_refused_where_every_image_is_labelled(tmp_path, capsys):
    src = make_cars_images(tmp_path / "dl")
    labels = write_cars_test_labels(tmp_path / "labels.mat")
    code, _, err = run(capsys, "cars", src, tmp_path / "out", "--test_annos", labels)
    assert code == 2 and "--test_annos is for the devkit layout" in err


def test_cars_parquet_export(tmp_path, capsys):
    from cmal.folders import check_layout as scan
    src = make_cars_parquet(tmp_path / "dl")
    code, out_text, _ = run(capsys, "cars", src, tmp_path / "out")
    out = tmp_path / "out"
    assert code == 0
    check_layout(out, 4, 3, 3)
    # Class names from the ClassLabel in the schema metadata; file names from the image paths.
    assert classes(out, "train") == ["AM General Hummer SUV 2000",
                                     "Ram C_V Cargo Van Minivan 2012",
                                     "smart fortwo Convertible 2012"]
    assert images(out, "train")[1:3] == ["Ram C_V Cargo Van Minivan 2012/00002.jpg",
                                         "Ram C_V Cargo Van Minivan 2012/00004.jpg"]
    assert (out / "test" / "Ram C_V Cargo Van Minivan 2012" / "00001.jpg").read_bytes() == \
        jpeg_bytes(seed=10)
    assert "files: 7 new files (from parquet)" in out_text
    found, samples = scan(out)
    assert len(found) == 3 and (len(samples["train"]), len(samples["test"])) == (4, 3)


def test_parquet_without_class_names_uses_the_label_indices(tmp_path, capsys):
    src = tmp_path / "dl"
    for split, labels in (("train", [0, 1, 2, 2]), ("test", [2, 1, 0])):
        images = [{"bytes": jpeg_bytes(seed=n), "path": None} for n in range(len(labels))]
        save_parquet(src / "default" / split / "0000.parquet",  # split named by the folder
                     {"image": images, "label": labels})
    code, _, _ = run(capsys, "cars", src, tmp_path / "out")
    assert code == 0
    check_layout(tmp_path / "out", 4, 3, 3)
    assert classes(tmp_path / "out", "test") == ["0", "1", "2"]
    # Zero-padded where the indices have several digits, so that the folders sort as they do.
    assert class_namer([0, 5, 12], None, "x")(5) == "05"


def test_parquet_export_without_test_labels_is_refused(tmp_path, capsys):
    src = make_cars_parquet(tmp_path / "dl", test_labels=[-1, -1, -1])
    code, _, err = run(capsys, "cars", src, tmp_path / "out")
    assert code == 2
    assert "test-00000-of-00001.parquet" in err and "3 of its 3 rows have no label" in err
    assert "withholds the labels" in err
    assert not (tmp_path / "out").exists()


def test_parquet_needs_pyarrow_and_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    src = make_cars_parquet(tmp_path / "dl")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # what `import pyarrow` meets when absent
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code, _, err = run(capsys, "cars", src, tmp_path / "out")
    assert code == 2 and "needs pyarrow" in err and "pip install pyarrow" in err
    assert "[parquet]" in err and "Traceback" not in err


def test_parquet_file_without_a_split_name_is_refused(tmp_path, capsys):
    src = make_cars_parquet(tmp_path / "dl")
    os.replace(src / "test-00000-of-00001.parquet", src / "part-0.parquet")
    code, _, err = run(capsys, "cars", src, tmp_path / "out")
    assert code == 2 and f"cannot tell which split {src / 'part-0.parquet'} holds" in err


def test_parquet_export_without_test_split_suggests_its_validation_split(tmp_path, capsys):
    src = make_cars_parquet(tmp_path / "dl")
    os.replace(src / "test-00000-of-00001.parquet", src / "validation-00000-of-00001.parquet")
    code, _, err = run(capsys, "cars", src, tmp_path / "out")
    assert code == 2 and "has no test split" in err and "--validation_to test" in err
    code, _, _ = run(capsys, "cars", src, tmp_path / "out", "--validation_to", "test")
    assert code == 0
    check_layout(tmp_path / "out", 4, 3, 3)


@pytest.mark.parametrize("option, message", [
    (["--label_column", "kind"], "has no column 'kind' (given by --label_column); its columns: "
                                 "image, label"),
])
def test_parquet_label_column_must_exist(tmp_path, capsys, option, message):
    src = make_cars_parquet(tmp_path / "dl")
    code, _, err = run(capsys, "cars", src, tmp_path / "out", *option)
    assert code == 2 and message in err


def test_label_column_option_without_parquet_files_is_refused(tmp_path, capsys):
    src = make_cars_devkit(tmp_path / "dl")
    code, _, err = run(capsys, "cars", src, tmp_path / "out", "--label_column", "label")
    assert code == 2 and "--label_column is for parquet exports" in err


# ---- CUB-200-2011 ------------------------------------------------------------------------------

def test_cub(tmp_path, capsys):
    make_cub(tmp_path / "dl")
    # Given the folder the archive was extracted into.
    code, out_text, _ = run(capsys, "cub", tmp_path / "dl", tmp_path / "out")
    out = tmp_path / "out"
    assert code == 0
    check_layout(out, 6, 3, 3, boxes=True)
    assert classes(out, "train") == CUB_CLASSES
    assert images(out, "test") == ["001.Black_footed_Albatross/Black_footed_Albatross_0003_103.jpg",
                                   "002.Laysan_Albatross/Laysan_Albatross_0003_106.jpg",
                                   "003.Sooty_Albatross/Sooty_Albatross_0003_109.jpg"]
    assert "train: 6 images, 3 classes; test: 3 images, 3 classes" in out_text
    boxes = read_boxes(out / "boxes.csv")
    assert len(boxes) == 9
    # x y width height (6, 3, 10, 8.5) -> x0 y0 x1 y1, decimals kept where the source has them.
    assert boxes[Path("train", CUB_CLASSES[0], "Black_footed_Albatross_0002_102.jpg")] == \
        (6, 3, 16, 11.5)
    assert f"train,{CUB_CLASSES[0]},Black_footed_Albatross_0002_102.jpg,6,3,16,11.5" in \
        (out / "boxes.csv").read_text().splitlines()


def test_boxes_file_convention_in_pixels(tmp_path, capsys):
    """x0, y0 inclusive, x1, y1 exclusive: the box of Image.crop and of array[y0:y1, x0:x1]."""
    make_cub(tmp_path / "dl")
    assert run(capsys, "cub", tmp_path / "dl", tmp_path / "out")[0] == 0
    image = Path("train", CUB_CLASSES[0], "Black_footed_Albatross_0001_101.png")
    box = read_boxes(tmp_path / "out" / "boxes.csv")[image]
    with Image.open(tmp_path / "out" / image) as img:
        pixels = np.asarray(img.convert("L"))
        assert img.crop(box).size == (10, 8)
        assert (np.asarray(img.crop(box).convert("L")) == 230).all()
    x0, y0, x1, y1 = map(int, box)
    rows, cols = np.nonzero(pixels == 230)  # the bright block is exactly the annotated box
    assert (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1) == (x0, y0, x1, y1)
    # The sources' conventions: 1-based inclusive corners (Cars, Aircraft), x y width height
    # (CUB); columns 1 to 10 (1-based) are 10 columns, 0 to 9 (0-based).
    assert box_from_corners(1, 1, 10, 5) == (0, 0, 10, 5)
    assert box_from_size(5, 3, 10, 8) == (5, 3, 15, 11)


def test_cub_without_boxes_writes_no_boxes_file(tmp_path, capsys):
    cub = make_cub(tmp_path / "dl")
    (cub / "bounding_boxes.txt").unlink()
    code, out_text, _ = run(capsys, "cub", cub, tmp_path / "out")
    assert code == 0 and "boxes:" not in out_text
    check_layout(tmp_path / "out", 6, 3, 3)


def test_cub_missing_annotation_file_is_refused(tmp_path, capsys):
    cub = make_cub(tmp_path / "dl")
    (cub / "image_class_labels.txt").unlink()
    code, _, err = run(capsys, "cub", cub, tmp_path / "out")
    assert code == 2 and "missing CUB-200-2011 annotation file" in err
    assert str(cub / "image_class_labels.txt") in err


def test_cub_image_without_a_class_is_refused(tmp_path, capsys):
    cub = make_cub(tmp_path / "dl")
    labels = cub / "image_class_labels.txt"
    labels.write_text("".join(labels.read_text().splitlines(keepends=True)[:-1]))
    code, _, err = run(capsys, "cub", cub, tmp_path / "out")
    assert code == 2 and f"{labels} has no line for image id 9" in err


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
    assert classes(out, "train") == sorted(FOOD11_CLASSES)
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


def test_food11_copy_with_unlabelled_evaluation_is_refused(tmp_path, capsys):
    src = make_food11_unlabelled(tmp_path / "dl")
    code, _, err = run(capsys, "food11", src, tmp_path / "out")
    assert code == 2
    assert f"{src / 'evaluation'} holds images named without a class index (0000.jpg" in err
    assert "carry no labels" in err and "food11-image-dataset" in err
    assert not (tmp_path / "out").exists()


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
    outputs = [p for p in (tmp_path / "out").rglob("*.jpg")]
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
    ("cub", "image_class_labels.txt"),
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
    names = folder_names(["F/A-18", "F_A-18", "Cessna 172", ".hidden", "a\\b"])
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
    assert all(word in helped.stdout for word in ("aircraft", "cars", "cub", "food11", "--copy",
                                                   "--validation_to", "--test_annos",
                                                   "--label_column", "train/<class>",
                                                   "boxes.csv", "parquet"))
    (tmp_path / "empty").mkdir()
    refused = cli("aircraft", tmp_path / "empty", tmp_path / "out")
    assert refused.returncode == 2 and refused.stderr.startswith("error: ")
    assert "does not look like FGVC-Aircraft" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_food11_validation_to_val_feeds_val_split_folder(tmp_path, capsys):
    from cmal.folders import check_layout as scan
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


def test_a_full_disk_is_named_and_leaves_no_partial_output(tmp_path, capsys, monkeypatch):
    import errno

    def full(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"\xff\xd8")  # the first bytes, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    src = make_aircraft(tmp_path / "dl")  # re-encoded (the banner is cut off): new files
    before = tree(src)
    monkeypatch.setattr(Image.Image, "save", full)
    code, _, err = run(capsys, "aircraft", src, tmp_path / "out")
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert f"no space left on the device holding {tmp_path}/out.incomplete-" in err
    assert "the partial output is removed (the source is untouched); free space" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dl"] and tree(src) == before
