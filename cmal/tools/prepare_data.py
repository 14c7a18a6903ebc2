"""Turn a dataset as it is distributed into the layout the training scripts read.

    python -m cmal.tools.prepare_data aircraft SRC OUT [--copy]
    python -m cmal.tools.prepare_data cars     SRC OUT [--copy] [--test_annos FILE]
    python -m cmal.tools.prepare_data cub      SRC OUT [--copy]
    python -m cmal.tools.prepare_data food11   SRC OUT [--copy] [--validation_to {train,test,val,skip}]

OUT receives train/<class>/<image> and test/<class>/<image>, with the same class folders in both
splits. The layout of SRC is recognised from the files it holds (see --help for each dataset's);
where it lacks a file the conversion needs, the error names that file and where it is published.
Any dataset may also be given as a HuggingFace parquet export: a folder of *.parquet files whose
names (train-00000-of-00001.parquet, data/test-*.parquet) or folders (train/0000.parquet) say the
split; reading them needs pyarrow (pip install pyarrow, or the package's `parquet` extra).

The source is only read. Files are hard links to the source by default (symbolic links, then
copies, where linking fails); aircraft images are always new files, since their copyright banner
is cut off, and images from parquet exports are new files. OUT is built under a temporary name
and renamed at the end, so it is either complete or absent.

Bounding boxes, where the source has them (Stanford Cars' annotation files, FGVC-Aircraft's
images_box.txt, CUB's bounding_boxes.txt), are kept in OUT/boxes.csv (write_boxes/read_boxes):

    split,class,file,x0,y0,x1,y1
    train,Cessna 172,0001701.jpg,12,30,640,377      (an example)

one row per image that has a box: OUT/<split>/<class>/<file> is the image. Coordinates are in
pixels of that image, from its top-left corner, with pixel edges at integers: (x0, y0) is the
top-left corner of the first pixel inside the box (inclusive), (x1, y1) the bottom-right corner
of the last one (exclusive), so the box spans x1 - x0 columns and y1 - y0 rows: the box of
PIL's Image.crop and of array[y0:y1, x0:x1]. Numbers are integers where the source's are, else
decimals (CUB's). The sources' own conventions are converted: the 1-based inclusive xmin, ymin,
xmax, ymax of Stanford Cars (MATLAB files) and FGVC-Aircraft become xmin - 1, ymin - 1, xmax,
ymax; CUB's x, y, width, height become x, y, x + width, y + height. Aircraft boxes are clipped to
the image left once the banner is cut off. Boxes are not read from parquet exports.
"""
import argparse
import csv
import io
import json
import math
import os
import re
import shutil
import sys
from collections import Counter, namedtuple
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from PIL import Image, JpegImagePlugin

from cmal.errors import UserError, run_command

# The extensions torchvision's ImageFolder reads; other files are not images to the training.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

BOXES_FILE = "boxes.csv"
BOX_COLUMNS = ("split", "class", "file", "x0", "y0", "x1", "y1")

AIRCRAFT_LISTS = {"train": "images_variant_trainval.txt", "test": "images_variant_test.txt"}
AIRCRAFT_BOXES = "images_box.txt"
AIRCRAFT_BANNER = 20  # pixel rows of copyright text at the bottom of every FGVC-Aircraft image

CARS_TEST_LABELS = "cars_test_annos_withlabels.mat"
# Browsers save a second download of the file as "cars_test_annos_withlabels (1).mat".
CARS_TEST_LABELS_GLOB = "cars_test_annos_withlabels*.mat"
CARS_ALL_ANNOTATIONS = "cars_annos.mat"  # beside car_ims/: every image's class, box and split
CARS_TEST_LABELS_WHERE = (
    "It is published as a separate file on the Kaggle dataset page \"Stanford Cars Dataset\" "
    "(jessicali9530/stanford-cars-dataset) and in other mirrors of Stanford Cars; torchvision's "
    "StanfordCars issue pytorch/vision#7545 on GitHub points to a copy.")

CUB_FILES = {"images": "images.txt", "split": "train_test_split.txt",
             "labels": "image_class_labels.txt", "classes": "classes.txt"}
CUB_BOXES = "bounding_boxes.txt"

FOOD11_CLASSES = ("Bread", "Dairy product", "Dessert", "Egg", "Fried food", "Meat",
                  "Noodles-Pasta", "Rice", "Seafood", "Soup", "Vegetable-Fruit")
FOOD11_FLAT_NAME = re.compile(r"(\d+)_\d+\.\w+")  # <class index>_<n>.jpg
FOOD11_UNLABELLED_NAME = re.compile(r"\d+\.\w+")  # <n>.jpg: no class index
# Validation images are prefixed so that they cannot collide with training or evaluation images,
# which reuse the same <class index>_<n> names.
FOOD11_VALIDATION_PREFIX = "validation_"

# Split names in the file or folder names of parquet exports; None: where --validation_to says.
PARQUET_SPLITS = {"train": "train", "trainval": "train", "test": "test",
                  "validation": None, "valid": None, "val": None}
PARQUET_DEPTH = 3  # data/train-*.parquet, <config>/<split>/0000.parquet: no deeper
# Columns taken as the class, in this order, when --label_column is not given; "variant" is
# FGVC-Aircraft's 100-class level (its family and manufacturer levels are coarser).
PARQUET_LABEL_COLUMNS = ("label", "labels", "variant", "fine_label", "class")
PARQUET_UNLABELLED = -1  # what a HuggingFace ClassLabel holds for "no label"
PIL_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif",
                  "PPM": ".ppm"}

# Characters that cannot appear in a folder name here or on Windows, and control characters.
UNSAFE_CHARS = re.compile(r'[/\\:*?"<>|\x00-\x1f]')


class PrepareError(UserError):
    """A source or destination the converter cannot use; the message says what it expected."""


class BoxesError(UserError, ValueError):
    """A boxes file (or box) that does not follow the format of BOXES_FILE."""


class Item(namedtuple("Item", "source split label name box", defaults=(None,))):
    """One image to write: source (a Path, or a Blob of bytes) -> OUT/split/label/name, with its
    box (x0, y0, x1, y1 in the source image, as in BOXES_FILE) or None."""

    @property
    def dest(self):
        return Path(self.split, self.label, self.name)


class Blob(namedtuple("Blob", "data origin")):
    """An image held in memory (from a parquet export); `origin` says where it was read."""

    def __str__(self):
        return self.origin


Box = namedtuple("Box", "x0 y0 x1 y1")


# ---- helpers shared by the datasets ------------------------------------------------------------

def is_image(path):
    return path.name.lower().endswith(IMAGE_EXTENSIONS) and not path.name.startswith(".")


def visible_entries(folder):
    # Hidden entries (.DS_Store, ._* resource forks of macOS archives) are never data.
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def folder_name(name):
    """A class name as a folder name: path separators and characters some systems refuse become
    '_'; a leading dot is dropped, as it would hide the folder from the data loader."""
    safe = UNSAFE_CHARS.sub("_", name).strip().lstrip(".").strip()
    return safe or "_"


def folder_names(names):
    """{class name: folder name}, unique even where two names differ only by unsafe characters
    or by case (case-insensitive file systems would merge them)."""
    result, taken = {}, set()
    for name in sorted(set(names)):
        base = candidate = folder_name(name)
        n = 2
        while candidate.casefold() in taken:
            candidate, n = f"{base} ({n})", n + 1
        taken.add(candidate.casefold())
        result[name] = candidate
    return result


def first_existing(candidates):
    return next((p for p in candidates if p.exists()), None)


def unrecognised(dataset, src, expected, looked_in):
    looked = ", ".join(str(p) for p in looked_in)
    return (f"{src} does not look like {dataset}.\nExpected {expected}.\nLooked in: {looked}")


def require(paths, what):
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise PrepareError(f"missing {what}: " + ", ".join(str(p) for p in missing))


def some(values, limit=5):
    values = [str(v) for v in values]
    more = f" ... ({len(values)} in all)" if len(values) > limit else ""
    return ", ".join(values[:limit]) + more


def class_folder_items(folder, split, prefix=""):
    """Items of a folder holding one folder of images per class, names kept (with `prefix`)."""
    items = []
    for class_dir in visible_entries(folder):
        if class_dir.is_dir():
            items += [Item(f, split, class_dir.name, prefix + f.name)
                      for f in visible_entries(class_dir) if is_image(f) and f.is_file()]
    return items


def read_table(path, columns):
    """[(line number, [values])] of a text file of space-separated `columns` per line; the last
    column takes the rest of the line (FGVC-Aircraft's variant names contain spaces)."""
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        values = line.split(maxsplit=len(columns) - 1)
        if len(values) != len(columns):
            raise PrepareError(f"{path}, line {number}: expected "
                               f"'{' '.join(f'<{c}>' for c in columns)}', got {line!r}")
        rows.append((number, values))
    return rows


def numbers(path, number, values):
    try:
        result = [float(v) for v in values]
    except ValueError:
        result = []
    if len(result) != len(values) or not all(map(math.isfinite, result)):
        raise PrepareError(f"{path}, line {number}: expected numbers, got {' '.join(values)!r}")
    return result


# ---- boxes.csv ---------------------------------------------------------------------------------

def box_from_corners(xmin, ymin, xmax, ymax):
    """The box of 1-based inclusive corners (Stanford Cars, FGVC-Aircraft)."""
    # max(0, ...): an annotation at 0, outside the 1-based range, still means the first pixel.
    return Box(max(xmin - 1, 0), max(ymin - 1, 0), xmax, ymax)


def box_from_size(x, y, width, height):
    """The box of a top-left corner and a size (CUB)."""
    return Box(x, y, x + width, y + height)


def box_problem(box):
    """Why `box` is not a box of BOXES_FILE, or None."""
    if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        return "expected four finite numbers x0, y0, x1, y1"
    x0, y0, x1, y1 = box
    if x0 < 0 or y0 < 0:
        return "x0 and y0 must be 0 or more (pixels from the top-left corner)"
    if x1 <= x0 or y1 <= y0:
        return "x1 must exceed x0 and y1 exceed y0 (x1, y1 are exclusive)"
    return None


def clip_box(box, width, height):
    """`box` within a width x height image; None where nothing of it is left."""
    clipped = Box(box.x0, box.y0, min(box.x1, width), min(box.y1, height))
    return None if box_problem(clipped) else clipped


def format_coordinate(value):
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def write_boxes(path, boxes):
    """Write BOXES_FILE at `path` from {image path relative to the dataset root (split/class/
    file): (x0, y0, x1, y1)}; the format is in this module's docstring."""
    rows = []
    for image, box in boxes.items():
        parts = Path(image).parts
        if len(parts) != 3:
            raise BoxesError(f"{image}: a boxed image is named split/class/file")
        problem = box_problem(tuple(box))
        if problem:
            raise BoxesError(f"box {tuple(box)} of {image}: {problem}")
        rows.append(list(parts) + [format_coordinate(v) for v in box])
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(BOX_COLUMNS)
        writer.writerows(sorted(rows))


def read_boxes(path):
    """{Path(split, class, file): Box} of a BOXES_FILE; BoxesError names the line at fault."""
    path = Path(path)
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise BoxesError(f"cannot read the boxes file {path}: {exc.strerror}") from None
    boxes = {}
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or tuple(header) != BOX_COLUMNS:
            raise BoxesError(f"{path}: the first line must be {','.join(BOX_COLUMNS)}, "
                             f"got {','.join(header or [])!r}")
        for row in reader:
            where = f"{path}, line {reader.line_num}"
            if len(row) != len(BOX_COLUMNS):
                raise BoxesError(f"{where}: expected {len(BOX_COLUMNS)} fields, got {len(row)}")
            if not all(row[:3]):
                raise BoxesError(f"{where}: split, class and file must not be empty")
            try:
                box = Box(*(float(v) for v in row[3:]))
            except ValueError:
                raise BoxesError(f"{where}: coordinates must be numbers, got {row[3:]}") from None
            problem = box_problem(box)
            if problem:
                raise BoxesError(f"{where}: {problem}")
            image = Path(*row[:3])
            if image in boxes:
                raise BoxesError(f"{where}: a second box for {image}")
            boxes[image] = box
    return boxes


# ---- FGVC-Aircraft 2013b -----------------------------------------------------------------------

def find_aircraft_data(src):
    """The `data` folder of fgvc-aircraft-2013b, given it, its parent or the archive's folder."""
    candidates = [src, src / "data", src / "fgvc-aircraft-2013b" / "data"]
    for folder in candidates:
        if (folder / "images").is_dir() or any((folder / f).is_file()
                                               for f in AIRCRAFT_LISTS.values()):
            return folder
    raise PrepareError(unrecognised(
        "FGVC-Aircraft 2013b", src,
        "the extracted fgvc-aircraft-2013b folder (or its data/ subfolder) holding "
        f"data/images/<id>.jpg, data/{AIRCRAFT_LISTS['train']} and data/{AIRCRAFT_LISTS['test']}"
        "; or a folder of HuggingFace parquet files (train-*.parquet, test-*.parquet)",
        candidates))


def read_aircraft_list(path):
    """[(image id, variant)] of an images_variant_*.txt; variants may contain spaces."""
    return [(image_id, variant.strip())
            for _, (image_id, variant) in read_table(path, ("image id", "variant"))]


def read_aircraft_boxes(path):
    """{image id: Box} of images_box.txt (1-based inclusive xmin ymin xmax ymax); {} where the
    file is absent, as the images and labels are usable without it."""
    if not path.is_file():
        return {}
    return {values[0]: box_from_corners(*numbers(path, number, values[1:]))
            for number, values in read_table(path, ("image id", "xmin", "ymin", "xmax", "ymax"))}


def plan_aircraft(src, args):
    data = find_aircraft_data(src)
    lists = {split: data / name for split, name in AIRCRAFT_LISTS.items()}
    require([data / "images"], "image folder of FGVC-Aircraft")
    require(lists.values(), "FGVC-Aircraft annotation file")
    pairs = {split: read_aircraft_list(path) for split, path in lists.items()}
    boxes = read_aircraft_boxes(data / AIRCRAFT_BOXES)
    folders = folder_names(variant for split in pairs.values() for _, variant in split)
    return [Item(data / "images" / f"{image_id}.jpg", split, folders[variant], f"{image_id}.jpg",
                 boxes.get(image_id))
            for split, split_pairs in pairs.items() for image_id, variant in split_pairs]


# ---- Stanford Cars -----------------------------------------------------------------------------

CARS_DEVKIT_MARKERS = ("cars_train", "cars_test", "devkit", "car_devkit", CARS_TEST_LABELS)


def find_cars_class_folders(src):
    for root in (src, src / "car_data", src / "car_data" / "car_data"):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    return None


def cars_layout(src):
    """Which Stanford Cars layout `src` holds: "folders", "car_ims", "devkit" or None."""
    if find_cars_class_folders(src) is not None:
        return "folders"
    car_ims = (src / "car_ims").is_dir()
    annotations = find_cars_all_annotations(src) is not None
    if car_ims and annotations:  # complete on its own: preferred to a devkit beside it
        return "car_ims"
    if any((src / marker).exists() for marker in CARS_DEVKIT_MARKERS):
        return "devkit"
    # Half of the car_ims layout: planned, so that the error names the missing half.
    return "car_ims" if car_ims or annotations else None


def plan_cars(src, args):
    if (src / "stanford_cars").is_dir():  # torchvision's root: StanfordCars(root) reads it
        src = src / "stanford_cars"
    layout = cars_layout(src)
    if layout == "folders":
        refuse_test_annos(args, "one folder per class")
        root = find_cars_class_folders(src)
        return [item for split in ("train", "test")
                for item in class_folder_items(root / split, split)]
    if layout == "car_ims":
        refuse_test_annos(args, f"car_ims/ and {CARS_ALL_ANNOTATIONS}")
        return plan_cars_images(src, find_cars_all_annotations(src))
    if layout == "devkit":
        return plan_cars_devkit(src, args.test_annos)
    raise PrepareError(unrecognised(
        "Stanford Cars", src,
        "one of: the devkit layout, cars_train/*.jpg, cars_test/*.jpg, devkit/cars_meta.mat, "
        f"devkit/cars_train_annos.mat and {CARS_TEST_LABELS} (Kaggle's nested cars_train/"
        "cars_train/, cars_test/cars_test/ and car_devkit/devkit/ too, and torchvision's "
        f"ROOT/stanford_cars/); car_ims/*.jpg with {CARS_ALL_ANNOTATIONS}; one folder per class, "
        "train/<class>/*.jpg and test/<class>/*.jpg (also under car_data/car_data/); or a folder "
        "of HuggingFace parquet files (train-*.parquet, test-*.parquet)",
        [src, src / "car_data", src / "car_data" / "car_data"]))


def refuse_test_annos(args, layout):
    if args.test_annos is not None:
        raise PrepareError(f"--test_annos is for the devkit layout, whose test labels come "
                           f"apart; {args.src} holds {layout}, which label every image")


def find_cars_all_annotations(src):
    return first_existing([src / CARS_ALL_ANNOTATIONS, src / "devkit" / CARS_ALL_ANNOTATIONS])


def cars_image_folder(src, name):
    # Some mirrors nest the archive's folder in one of the same name (cars_train/cars_train/).
    nested = src / name / name
    return nested if nested.is_dir() else src / name


def load_mat_variable(path, key):
    """A variable of a MATLAB file as a 1-d array (scipy squeezes a 1-element array to a 0-d
    one, which would not iterate)."""
    # Imported here: only the cars annotations need them, and scipy takes a while to load.
    import numpy as np
    from scipy.io import loadmat
    try:
        content = loadmat(path, squeeze_me=True)
    except Exception as exc:  # scipy raises assorted types for files that are not .mat files
        raise PrepareError(f"cannot read {path} as a MATLAB file: {exc}") from None
    if key not in content:
        found = [k for k in content if not k.startswith("__")]
        raise PrepareError(f"{path} has no '{key}' variable (it has: {some(found)})")
    return np.atleast_1d(content[key])


def load_cars_annotations(path, needed, hint=""):
    """The 'annotations' struct array of a cars_*annos*.mat, with its `needed` fields checked."""
    annotations = load_mat_variable(path, "annotations")
    fields = annotations.dtype.names or ()
    missing = [f for f in needed if f not in fields]
    if missing:
        raise PrepareError(f"{path} has no {' and '.join(repr(f) for f in missing)} fields in "
                           f"'annotations' (it has: {some(fields)}).{hint}")
    return annotations


def cars_class(record, class_names, path, what):
    """The class name of an annotation record, whose 'class' is 1-based."""
    number = int(record["class"])
    if not 1 <= number <= len(class_names):
        raise PrepareError(f"{path}: class {number} of {what} is outside 1..{len(class_names)} "
                           "(the number of class names)")
    return class_names[number - 1]


def cars_box(record):
    """The box of an annotation record (1-based inclusive bbox_x1..bbox_y2), where it has one."""
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
    if not all(f in (record.dtype.names or ()) for f in fields):
        return None
    return box_from_corners(*(float(record[f]) for f in fields))


def read_cars_annotations(path, class_names):
    """[(file name, class name, box)] of a cars_{train_annos,test_annos_withlabels}.mat."""
    annotations = load_cars_annotations(
        path, ("class", "fname"),
        f" The test labels are in {CARS_TEST_LABELS}, a download separate from the devkit "
        "(devkit/cars_test_annos.mat has no labels).")
    return [(str(r["fname"]), cars_class(r, class_names, path, r["fname"]), cars_box(r))
            for r in annotations]


def find_cars_test_labels(src, devkit, given):
    """The test labels: `given` (--test_annos), or found in SRC, the devkit or above it."""
    if given is not None:
        require([given], "test annotation file given by --test_annos")
        return given
    folders = list(dict.fromkeys([src, devkit, devkit.parent]))
    exact = first_existing(folder / CARS_TEST_LABELS for folder in folders)
    found = exact or next((f for folder in folders if folder.is_dir()
                           for f in sorted(folder.glob(CARS_TEST_LABELS_GLOB))), None)
    if found is None:
        raise PrepareError(
            f"missing {CARS_TEST_LABELS}, the labels of the test images (looked in "
            f"{some(folders)}). The devkit's cars_test_annos.mat has no labels, and neither the "
            f"image folders nor the devkit hold this file. {CARS_TEST_LABELS_WHERE} Put it in "
            f"{src} or {devkit}, or pass --test_annos=FILE.")
    return found


def plan_cars_devkit(src, test_annos=None):
    devkit = first_existing([src / "devkit", src / "car_devkit" / "devkit"]) or src / "devkit"
    images = {"train": cars_image_folder(src, "cars_train"),
              "test": cars_image_folder(src, "cars_test")}
    meta = devkit / "cars_meta.mat"
    require(images.values(), "Stanford Cars image folder")
    require([meta, devkit / "cars_train_annos.mat"], "Stanford Cars devkit file")
    annos = {"train": devkit / "cars_train_annos.mat",
             "test": find_cars_test_labels(src, devkit, test_annos)}
    class_names = [str(name) for name in load_mat_variable(meta, "class_names")]
    folders = folder_names(class_names)
    return [Item(images[split] / fname, split, folders[name], fname, box)
            for split in ("train", "test")
            for fname, name, box in read_cars_annotations(annos[split], class_names)]


def plan_cars_images(src, annotations_path):
    """car_ims/ with cars_annos.mat: every image's class, box and train/test flag in one file."""
    if annotations_path is None:
        raise PrepareError(
            f"missing {CARS_ALL_ANNOTATIONS} (looked in {src} and {src / 'devkit'}): car_ims/ "
            f"holds the images of both splits, and {CARS_ALL_ANNOTATIONS}, published beside "
            "car_ims.tgz, says which image is which class and split. Without it, use the devkit "
            f"layout (cars_train/, cars_test/, devkit/ and {CARS_TEST_LABELS}).")
    require([src / "car_ims"], f"image folder named by {annotations_path}")
    annotations = load_cars_annotations(annotations_path, ("relative_im_path", "class", "test"))
    class_names = [str(n) for n in load_mat_variable(annotations_path, "class_names")]
    folders = folder_names(class_names)
    items = []
    for r in annotations:
        relative = str(r["relative_im_path"])
        name = cars_class(r, class_names, annotations_path, relative)
        split = "test" if int(r["test"]) else "train"
        items.append(Item(src / relative, split, folders[name], Path(relative).name, cars_box(r)))
    return items


# ---- Food-11 -----------------------------------------------------------------------------------

def food11_unlabelled(folder, split, names):
    return PrepareError(
        f"{folder} holds images named without a class index ({some(names, 3)}): Food-11 names "
        "its images <class index>_<n>.jpg, so these carry no labels. This copy withholds the "
        f"labels of its {folder.name} split, and no {split} split can be made from it. Use a "
        "labelled copy: the official Food-11 (training/, validation/, evaluation/ of "
        "<class index>_<n>.jpg files) or Kaggle's \"food11-image-dataset\" (one folder per class "
        "in each split).")


def food11_flat_items(folder, split, prefix):
    """Items of a folder of <class index>_<n>.jpg files."""
    items, bad = [], []
    for f in filter(is_image, visible_entries(folder)):
        match = FOOD11_FLAT_NAME.fullmatch(f.name)
        if match is None or int(match[1]) >= len(FOOD11_CLASSES):
            bad.append(f.name)
        else:
            items.append(Item(f, split, FOOD11_CLASSES[int(match[1])], prefix + f.name))
    if bad and not items and all(FOOD11_UNLABELLED_NAME.fullmatch(name) for name in bad):
        raise food11_unlabelled(folder, split, bad)
    if bad:
        raise PrepareError(f"{folder} holds images not named <class index 0-10>_<n>.jpg: "
                           f"{some(bad)}")
    return items


def food11_folder_items(folder, split, prefix):
    """Items of a Food-11 split folder, flat (official) or with one folder per class."""
    entries = visible_entries(folder)
    if not any(e.is_dir() for e in entries):
        return food11_flat_items(folder, split, prefix)
    stray = [e.name for e in entries if e.is_file() and is_image(e)]
    if stray:
        raise PrepareError(f"{folder} mixes class folders with images outside them "
                           f"({some(stray)}); expected one or the other")
    return class_folder_items(folder, split, prefix)


def find_food11_root(src, folders):
    candidates = [src, src / "Food-11"]  # the archive's own folder, if given its parent
    for root in candidates:
        if any((root / folder).is_dir() for folder in folders):
            return root
    raise PrepareError(unrecognised(
        "Food-11", src,
        "folders training/, validation/ and evaluation/, each holding either "
        "<class index>_<n>.jpg files or one folder of images per class; or a folder of "
        "HuggingFace parquet files (train-*.parquet, test-*.parquet)", candidates))


def plan_food11(src, args):
    splits = {"training": "train", "evaluation": "test"}
    if args.validation_to != "skip":
        splits["validation"] = args.validation_to
    src = find_food11_root(src, splits)
    missing = [src / folder for folder in splits if not (src / folder).is_dir()]
    if missing:
        hint = (" (or pass --validation_to skip)" if src / "validation" in missing else "")
        raise PrepareError(f"missing Food-11 folder: {some(missing)}{hint}")
    items = []
    for folder, split in splits.items():
        prefix = FOOD11_VALIDATION_PREFIX if folder == "validation" else ""
        items += food11_folder_items(src / folder, split, prefix)
    return items


# ---- CUB-200-2011 ------------------------------------------------------------------------------

def find_cub_root(src):
    """The CUB_200_2011 folder, given it or the folder it was extracted into."""
    candidates = [src, src / "CUB_200_2011"]
    for root in candidates:
        if (root / CUB_FILES["images"]).is_file() or (root / "images").is_dir():
            return root
    raise PrepareError(unrecognised(
        "CUB-200-2011", src,
        "the extracted CUB_200_2011 folder holding images/<class>/<image>.jpg, "
        + ", ".join(CUB_FILES.values()) + f" (and {CUB_BOXES}); or a folder of HuggingFace "
        "parquet files (train-*.parquet, test-*.parquet)", candidates))


def read_cub_table(path, columns):
    """{id: [values]} of a CUB file of '<id> <value>...' lines; ids are unique."""
    table = {}
    for number, values in read_table(path, ("id",) + columns):
        if values[0] in table:
            raise PrepareError(f"{path}, line {number}: id {values[0]} appears a second time")
        table[values[0]] = values[1:]
    return table


def cub_lookup(table, key, path, what):
    if key not in table:
        raise PrepareError(f"{path} has no line for {what} {key}")
    return table[key]


def read_cub_boxes(path):
    """{image id: Box} of bounding_boxes.txt (x y width height); {} where the file is absent, as
    the images and labels are usable without it."""
    if not path.is_file():
        return {}
    return {values[0]: box_from_size(*numbers(path, number, values[1:]))
            for number, values in read_table(path, ("image id", "x", "y", "width", "height"))}


def plan_cub(src, args):
    root = find_cub_root(src)
    paths = {key: root / name for key, name in CUB_FILES.items()}
    require([root / "images"], "image folder of CUB-200-2011")
    require(paths.values(), "CUB-200-2011 annotation file")
    images = read_cub_table(paths["images"], ("image name",))
    is_training = read_cub_table(paths["split"], ("is training image",))
    labels = read_cub_table(paths["labels"], ("class id",))
    classes = read_cub_table(paths["classes"], ("class name",))
    boxes = read_cub_boxes(root / CUB_BOXES)
    folders = folder_names(name for (name,) in classes.values())
    items = []
    for image_id, (name,) in images.items():
        (flag,) = cub_lookup(is_training, image_id, paths["split"], "image id")
        if flag not in ("0", "1"):
            raise PrepareError(f"{paths['split']}: image id {image_id} has is_training_image "
                               f"{flag!r}; expected 1 (train) or 0 (test)")
        (class_id,) = cub_lookup(labels, image_id, paths["labels"], "image id")
        (class_name,) = cub_lookup(classes, class_id, paths["classes"], "class id")
        items.append(Item(root / "images" / name, "train" if flag == "1" else "test",
                          folders[class_name], Path(name).name, boxes.get(image_id)))
    return items


# ---- HuggingFace parquet exports (any dataset) -------------------------------------------------

def import_parquet():
    """pyarrow.parquet, or an error saying how to install it (it is an optional dependency)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise PrepareError(
            "reading parquet files needs pyarrow, which is not installed: pip install pyarrow "
            "(or install this package with its parquet extra: pip install -e '.[parquet]')"
        ) from None
    return pq


def find_parquet_files(src):
    """The *.parquet files of a HuggingFace export in `src`, at most PARQUET_DEPTH levels down,
    hidden folders (such as the hub's .cache/) left out."""
    found = []
    for depth in range(1, PARQUET_DEPTH + 1):
        for path in src.glob("/".join(["*"] * depth) + ".parquet"):
            if path.is_file() and not any(part.startswith(".")
                                          for part in path.relative_to(src).parts):
                found.append(path)
    return sorted(found)


def parquet_split_word(path, src):
    """The split a parquet file holds, from its name (train-00000-of-00001.parquet,
    cars-test.parquet) or else from its folders (train/0000.parquet)."""
    words = {w for w in re.split(r"[-_.]", path.stem.lower()) if w in PARQUET_SPLITS}
    if len(words) == 1:
        return words.pop()
    for folder in reversed(path.relative_to(src).parts[:-1]):
        if folder.lower() in PARQUET_SPLITS:
            return folder.lower()
    raise PrepareError(
        f"cannot tell which split {path} holds: its name or folder should name it, as in "
        f"train-00000-of-00001.parquet or test/0000.parquet (split names: "
        f"{', '.join(PARQUET_SPLITS)})")


def hf_features(schema):
    """The `features` of the HuggingFace metadata of an arrow schema; {} where absent."""
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        info = json.loads(raw).get("info", {}) if raw else {}
        features = info.get("features", {})
    except (ValueError, AttributeError):  # not JSON, or not the objects datasets writes
        return {}
    return features if isinstance(features, dict) else {}


def hf_type(features, column):
    feature = features.get(column)
    return feature.get("_type") if isinstance(feature, dict) else None


def holds_image_bytes(arrow_type):
    import pyarrow as pa
    if pa.types.is_struct(arrow_type):
        return arrow_type.get_field_index("bytes") >= 0
    return pa.types.is_binary(arrow_type) or pa.types.is_large_binary(arrow_type)


def parquet_image_column(path, schema, features):
    """The column of the images: HuggingFace's Image feature, else a struct with 'bytes'."""
    columns = [n for n in schema.names if hf_type(features, n) == "Image"]
    columns = columns or [f.name for f in schema if holds_image_bytes(f.type)]
    if len(columns) > 1:
        columns = [n for n in columns if n in ("image", "img")] or columns
    if len(columns) != 1:
        raise PrepareError(
            f"cannot tell which column of {path} holds the images (columns: "
            f"{', '.join(schema.names)}): expected one HuggingFace Image column, or one column of "
            "structs with a 'bytes' field")
    return columns[0]


def parquet_label_column(path, schema, features, given):
    """The column of the classes: --label_column, else a usual name, else the one ClassLabel."""
    if given is not None:
        if given not in schema.names:
            raise PrepareError(f"{path} has no column {given!r} (given by --label_column); "
                               f"its columns: {', '.join(schema.names)}")
        return given
    usual = [n for n in PARQUET_LABEL_COLUMNS if n in schema.names]
    class_labels = [n for n in schema.names if hf_type(features, n) == "ClassLabel"]
    if usual or len(class_labels) == 1:
        return (usual or class_labels)[0]
    raise PrepareError(f"cannot tell which column of {path} holds the class (columns: "
                       f"{', '.join(schema.names)}); pass --label_column=NAME")


def class_label_names(features, column):
    """The class names of a HuggingFace ClassLabel column, or None."""
    if hf_type(features, column) != "ClassLabel":
        return None
    names = features[column].get("names")
    return [str(n) for n in names] if isinstance(names, list) and names else None


def image_blob(value, origin):
    """A Blob of an image cell: a struct {bytes, path} as HuggingFace writes it, or bytes.
    Returns (blob, the path recorded with it or None)."""
    data, recorded = (value.get("bytes"), value.get("path")) if isinstance(value, dict) else (
        value, None)
    if not data:
        kept = f" (only a path: {recorded})" if recorded else ""
        raise PrepareError(f"{origin} holds no image bytes{kept}; export the dataset with its "
                           "images embedded")
    return Blob(bytes(data), origin), recorded


def read_parquet_file(path, pq, label_column):
    """(class names or None, [(label, Blob, recorded path)]) of one parquet file."""
    try:
        parquet = pq.ParquetFile(path)
        schema = parquet.schema_arrow
    except Exception as exc:  # pyarrow raises assorted types for files that are not parquet
        raise PrepareError(f"cannot read {path} as a parquet file: {exc}") from None
    features = hf_features(schema)
    image = parquet_image_column(path, schema, features)
    label = parquet_label_column(path, schema, features, label_column)
    rows, number = [], 0
    for batch in parquet.iter_batches(columns=[image, label]):
        columns = batch.to_pydict()
        for value, target in zip(columns[image], columns[label]):
            blob, recorded = image_blob(value, f"{path}, row {number}")
            rows.append((target, blob, recorded))
            number += 1
    unlabelled = sum(target is None or target == PARQUET_UNLABELLED for target, _, _ in rows)
    if unlabelled:
        raise PrepareError(
            f"{path}: {unlabelled} of its {len(rows)} rows have no label in column {label!r} "
            f"(empty, or {PARQUET_UNLABELLED}, HuggingFace's 'no label'): this export withholds "
            "the labels of the split this file holds, so that split cannot be made from it. Use "
            "an export or a download whose test images are labelled.")
    return class_label_names(features, label), rows


def class_namer(all_labels, names, where):
    """A function label -> class name: names[label] for ClassLabel indices, the label itself for
    text labels, else the index zero-padded (so that the folders sort as the indices)."""
    kinds = {type(label) for label in all_labels}
    if kinds == {str}:
        return str
    if kinds != {int}:
        raise PrepareError(f"{where}: labels are {' and '.join(sorted(k.__name__ for k in kinds))}"
                           "; expected integers (class indices) or text (class names)")
    if names is None:
        width = len(str(max(all_labels)))
        return lambda label: f"{label:0{width}d}"
    outside = sorted({label for label in all_labels if not 0 <= label < len(names)})
    if outside:
        raise PrepareError(f"{where}: labels {some(outside)} are outside 0..{len(names) - 1}, the "
                           "classes named in the parquet metadata")
    return names.__getitem__


def image_file_name(blob, recorded, split, number, crop):
    """The file name of an image: the one recorded with it, else <split>_<number>.<format>."""
    name = folder_name(re.split(r"[\\/]", recorded)[-1]) if recorded else ""
    if not name.lower().endswith(IMAGE_EXTENSIONS):
        name = f"{split}_{number:06d}{image_extension(blob)}"
    return str(Path(name).with_suffix(".jpg")) if crop else name  # cut images are JPEG files


def image_extension(blob):
    try:
        with Image.open(io.BytesIO(blob.data)) as img:
            image_format = img.format
    except (OSError, SyntaxError, ValueError) as exc:
        raise PrepareError(f"{blob} is not a readable image: {exc}") from None
    if image_format not in PIL_EXTENSIONS:
        raise PrepareError(f"{blob} is a {image_format} image; the training reads "
                           f"{', '.join(PIL_EXTENSIONS)}")
    return PIL_EXTENSIONS[image_format]


def read_parquet_splits(files, src, args):
    """{split: [(label, Blob, recorded path)]} and the class names of the export's files."""
    pq = import_parquet()
    rows, names, seen = {}, None, Counter()
    for path in files:
        word = parquet_split_word(path, src)
        seen[word] += 1
        split = PARQUET_SPLITS[word] or args.validation_to
        if split == "skip":
            continue
        file_names, file_rows = read_parquet_file(path, pq, args.label_column)
        if names is not None and file_names is not None and file_names != names:
            raise PrepareError(f"{path} names its classes differently from the export's other "
                               "files; are they from one dataset?")
        names = names or file_names
        rows.setdefault(split, []).extend(file_rows)
    if "test" not in rows:
        hint = (" If its validation split is the benchmark's test split, pass "
                "--validation_to test." if any(PARQUET_SPLITS[w] is None for w in seen) else "")
        raise PrepareError(f"{src} has no test split: its parquet files hold "
                           f"{', '.join(f'{w} ({n} files)' for w, n in seen.items())}.{hint}")
    return rows, names


def plan_parquet(files, args):
    """Items of a parquet export; its images are held in memory (about the size of its files)
    until they are written."""
    src = args.src
    rows, names = read_parquet_splits(files, src, args)
    namer = class_namer([label for split in rows.values() for label, _, _ in split], names, src)
    folders = folder_names(namer(label) for split in rows.values() for label, _, _ in split)
    crop = DATASETS[args.dataset].crop
    items, taken = [], set()
    for split, split_rows in rows.items():
        for number, (label, blob, recorded) in enumerate(split_rows):
            folder = folders[namer(label)]
            name = image_file_name(blob, recorded, split, number, crop)
            if (split, folder, name.casefold()) in taken:  # two images recorded with one name
                name = f"{number:06d}_{name}"
            taken.add((split, folder, name.casefold()))
            items.append(Item(blob, split, folder, name))
    return items


# ---- checks and writing ------------------------------------------------------------------------

def check_items(items):
    """Refuse what the training would reject or what would overwrite an image."""
    classes = {split: {i.label for i in items if i.split == split} for split in ("train", "test")}
    for split, names in classes.items():
        if not names:
            raise PrepareError(f"found no {split} images")
    if classes["train"] != classes["test"]:
        raise PrepareError(
            "train and test would hold different classes; only in train: "
            f"{some(sorted(classes['train'] - classes['test'])) or 'none'}; only in test: "
            f"{some(sorted(classes['test'] - classes['train'])) or 'none'}")
    seen = Counter(i.dest for i in items)
    twice = [str(dest) for dest, n in seen.items() if n > 1]
    if twice:
        raise PrepareError(f"several images would be written to the same file: {some(twice)}")
    absent = [i.source for i in items if isinstance(i.source, Path) and not i.source.is_file()]
    if absent:
        raise PrepareError(f"{len(absent)} images listed by the annotations are missing: "
                           f"{some(absent)}")


def without_bad_boxes(items):
    """The items, with boxes that are empty or start before the image dropped (and said so):
    one odd annotation should not stop a conversion the boxes are an extra to."""
    bad = [i for i in items if i.box is not None and box_problem(i.box)]
    if not bad:
        return items
    print(f"note: {len(bad)} boxes are left out of {BOXES_FILE} ({box_problem(bad[0].box)}), "
          f"e.g. {tuple(bad[0].box)} of {bad[0].source}", flush=True)
    return [i._replace(box=None) if i.box is not None and box_problem(i.box) else i
            for i in items]


def check_destination(src, out):
    if not src.is_dir():
        raise PrepareError(f"source {src} does not exist or is not a folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PrepareError(f"{out} exists and is not an empty folder; give a new folder (mixing "
                           "two datasets in one folder would corrupt both)")
    out_abs, src_abs = out.resolve(), src.resolve()
    if out_abs == src_abs or src_abs in out_abs.parents:
        raise PrepareError(f"{out} is inside the source {src}, which must stay untouched")


def jpeg_options(img):
    """Options to re-encode `img` after cutting rows off its bottom.

    The source's own quantisation tables and chroma subsampling are reused: the crop keeps the
    top-left 8x8 block grid, so each block is re-quantised with the steps it had and mostly
    comes back exactly (a smaller error than quality 95 gives, at the source's file size).
    """
    if img.format != "JPEG":
        return {"quality": 95}
    options = {"qtables": img.quantization}
    sampling = JpegImagePlugin.get_sampling(img)
    if sampling != -1:
        options["subsampling"] = sampling
    if img.info.get("icc_profile"):
        options["icc_profile"] = img.info["icc_profile"]
    return options


def readable(source):
    """What Image.open and copying read `source` from: its path, or its bytes as a file."""
    return io.BytesIO(source.data) if isinstance(source, Blob) else source


def write_without_banner(source, dest):
    """Write `source` less its bottom banner as a JPEG file; returns the size written."""
    with Image.open(readable(source)) as img:
        if img.height <= AIRCRAFT_BANNER:
            raise PrepareError(f"{source} is only {img.height} px high, too small to hold the "
                               f"{AIRCRAFT_BANNER} px banner of FGVC-Aircraft images")
        kept = img.crop((0, 0, img.width, img.height - AIRCRAFT_BANNER))
        if kept.mode not in ("L", "RGB", "CMYK"):  # modes JPEG can hold
            kept = kept.convert("RGB")
        kept.save(dest, "JPEG", **jpeg_options(img))
        return kept.size


def link_or_copy(source, dest, links_allowed):
    """Place `source` at `dest` as cheaply as the file systems allow; returns how."""
    if isinstance(source, Blob):
        with open(dest, "xb") as f:
            f.write(source.data)
        return "new files (from parquet)"
    if links_allowed:
        try:
            os.link(source, dest)
            return "hard links"
        except FileExistsError:
            raise
        except OSError:  # another file system, or one without hard links
            pass
        try:
            # Absolute, since OUT is built under another name and then renamed.
            os.symlink(os.path.abspath(source), dest)
            return "symbolic links"
        except FileExistsError:
            raise
        except OSError:
            pass
    shutil.copy2(source, dest)
    return "copies"


def place(item, root, crop, links_allowed):
    """Write one item; returns how, and its box in the image written (None where it has none)."""
    dest = root / item.dest
    try:
        if crop:
            size = write_without_banner(item.source, dest)
            return "new files (banner cut off)", item.box and clip_box(item.box, *size)
        return link_or_copy(item.source, dest, links_allowed), item.box
    except PrepareError:
        raise
    # Unreadable image (Pillow raises OSError, SyntaxError or ValueError), full disk...: name
    # the file at fault.
    except (OSError, SyntaxError, ValueError) as exc:
        raise PrepareError(f"cannot write {item.source} to {dest}: {exc}") from None


def write_items(items, root, crop, links_allowed, workers):
    """Write every item below `root`; returns a Counter of how the files were written, and
    {image path relative to `root`: box} of the items that have one."""
    for folder in sorted({item.dest.parent for item in items}):
        (root / folder).mkdir(parents=True, exist_ok=True)
    how, boxes, step = Counter(), {}, max(len(items) // 10, 1)
    new_files = crop or any(isinstance(item.source, Blob) for item in items)
    # Threads suffice: Pillow releases the GIL while it decodes and encodes.
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        futures = {pool.submit(place, item, root, crop, links_allowed): item for item in items}
        try:
            for done, future in enumerate(as_completed(futures), 1):
                written, box = future.result()
                how[written] += 1
                if box is not None:
                    boxes[futures[future].dest] = box
                if new_files and done % step == 0:
                    print(f"  {done}/{len(items)} images", flush=True)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return how, boxes


def build(items, out, crop, links_allowed, workers):
    """Write OUT (images, and BOXES_FILE where there are boxes) under a temporary name next to
    it, then rename it: an interrupted run leaves no half-filled OUT that would look like a
    dataset. Returns how the files were written and the number of boxes."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f"{out.name}.incomplete-{os.getpid()}"
    partial.mkdir()
    try:
        how, boxes = write_items(items, partial, crop, links_allowed, workers)
        if boxes:
            write_boxes(partial / BOXES_FILE, boxes)
        if out.exists():
            out.rmdir()  # empty, as checked before
        partial.rename(out)
    except BaseException:
        # Removes links, never their targets: the source is unaffected.
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return how, len(boxes)


# ---- command line ------------------------------------------------------------------------------

Dataset = namedtuple("Dataset", "plan crop classes title")
DATASETS = {
    "aircraft": Dataset(plan_aircraft, True, 100, "FGVC-Aircraft 2013b"),
    "cars": Dataset(plan_cars, False, 196, "Stanford Cars"),
    "cub": Dataset(plan_cub, False, 200, "CUB-200-2011"),
    "food11": Dataset(plan_food11, False, 11, "Food-11"),
}

EPILOG = """\
sources (SRC), each recognised from the files it holds:
  aircraft  the extracted fgvc-aircraft-2013b folder, or its data/ subfolder: data/images/<id>.jpg,
            data/images_variant_trainval.txt (-> train), data/images_variant_test.txt (-> test),
            data/images_box.txt (boxes). The 20-pixel copyright banner at the bottom of each image
            is cut off (from parquet exports too), so images are always written as new JPEG files.
  cars      the devkit layout: cars_train/, cars_test/, devkit/cars_meta.mat,
            devkit/cars_train_annos.mat and cars_test_annos_withlabels.mat (top level or devkit/,
            or --test_annos FILE); Kaggle's copy with its nested cars_train/cars_train/,
            cars_test/cars_test/ and car_devkit/devkit/ (it lacks the test labels: add that file);
            torchvision's root holding stanford_cars/; car_ims/ with cars_annos.mat (classes,
            boxes and the test flag of every image); or folders per class: train/<class>/ and
            test/<class>/ (also under car_data/car_data/).
  cub       the extracted CUB_200_2011 folder: images/, images.txt, train_test_split.txt,
            image_class_labels.txt, classes.txt and bounding_boxes.txt (boxes).
  food11    the folder holding training/ (-> train), validation/ (-> train by default, see
            --validation_to) and evaluation/ (-> test), each holding <class index>_<n>.jpg files
            or one folder per class. Validation files get a "validation_" prefix. A copy whose
            evaluation images carry no class index has no test labels, and is refused.
  any       a HuggingFace parquet export: *.parquet files whose names or folders say the split
            (train-00000-of-00001.parquet, data/test-*.parquet, validation/0000.parquet), with an
            image column and a class column (label, or --label_column); class names from the
            ClassLabel in the files' metadata, else the label indices. Needs pyarrow.

OUT/boxes.csv keeps the sources' bounding boxes: split,class,file,x0,y0,x1,y1 in pixels of the
image written, x0, y0 inclusive and x1, y1 exclusive (as PIL's Image.crop takes them).
Class names that contain '/' become folder names with '_' (e.g. F/A-18 -> F_A-18).
OUT must not exist or be empty. Files that are not images (by extension) are not carried over.

examples:
  python -m cmal.tools.prepare_data aircraft ~/Downloads/fgvc-aircraft-2013b data/Aircraft
  python -m cmal.tools.prepare_data cars ~/Downloads/stanford-cars-dataset data/Stanford_Cars
  python -m cmal.tools.prepare_data cars ~/Downloads/cars_parquet data/Stanford_Cars
  python -m cmal.tools.prepare_data cub ~/Downloads/CUB_200_2011 data/CUB_200_2011
  python -m cmal.tools.prepare_data food11 ~/Downloads/Food-11 data/Food-11 --validation_to train
"""


def parse_args(argv):
    p = argparse.ArgumentParser(
        allow_abbrev=False,
        description="Convert a dataset download into OUT/train/<class>/<image> and\n"
                    "OUT/test/<class>/<image>, the layout the training scripts read.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", choices=sorted(DATASETS), help="which dataset SRC holds")
    p.add_argument("src", type=Path, metavar="SRC", help="the extracted download (only read)")
    p.add_argument("out", type=Path, metavar="OUT",
                   help="folder to create (must not exist or be empty)")
    p.add_argument("--copy", action="store_true",
                   help="copy the images instead of hard-linking them to the source (by default "
                        "hard links, or symbolic links, then copies, where linking fails; "
                        "aircraft images are always new files)")
    p.add_argument("--validation_to", choices=("train", "test", "val", "skip"), default="train",
                   help="food11 and parquet exports: where the validation images go (default: "
                        "train, as FGVC-Aircraft's trainval; val: OUT/val/, for training with "
                        "--val_split=folder)")
    p.add_argument("--test_annos", type=Path, metavar="FILE", default=None,
                   help=f"cars devkit layout: the test labels ({CARS_TEST_LABELS}) where they "
                        "are neither in SRC nor in its devkit folder")
    p.add_argument("--label_column", metavar="NAME", default=None,
                   help="parquet exports: the column holding the class (default: "
                        f"{', '.join(PARQUET_LABEL_COLUMNS)}, whichever comes first, or the one "
                        "ClassLabel column)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads writing images (default: number of CPUs)")
    return p.parse_args(argv)


def summary(items, out):
    parts = []
    for split in sorted({i.split for i in items}, key=("train", "val", "test").index):
        chosen = [i for i in items if i.split == split]
        parts.append(f"{split}: {len(chosen)} images, {len({i.label for i in chosen})} classes")
    return "; ".join(parts) + f" -> {out}"


def main(argv=None):
    args = parse_args(argv)
    dataset = DATASETS[args.dataset]
    return run_command(convert, dataset, args)


def plan(dataset, args):
    """The items of SRC, from its parquet files where it has some, else its dataset's layout."""
    parquet = find_parquet_files(args.src)
    if parquet:
        if args.test_annos is not None:
            raise PrepareError(f"--test_annos is for the Stanford Cars devkit; {args.src} holds "
                               "a parquet export")
        return plan_parquet(parquet, args), True
    if args.label_column is not None:
        raise PrepareError(f"--label_column is for parquet exports; {args.src} holds no "
                           "*.parquet files")
    return dataset.plan(args.src, args), False


def convert(dataset, args):
    check_destination(args.src, args.out)
    items, from_parquet = plan(dataset, args)
    items = without_bad_boxes(items)
    check_items(items)
    print(f"{dataset.title}: writing {len(items)} images to {args.out}", flush=True)
    how, n_boxes = build(items, args.out, dataset.crop, not args.copy, args.threads)
    print(summary(items, args.out))
    print("files: " + ", ".join(f"{n} {kind}" for kind, n in how.items()))
    if n_boxes:
        print(f"boxes: {n_boxes} images -> {args.out / BOXES_FILE}")
    found = len({i.label for i in items})
    if found != dataset.classes:
        hint = " and is the class column the right one (--label_column)" if from_parquet else ""
        print(f"note: {dataset.title} has {dataset.classes} classes, this source has {found}; "
              f"is the download complete{hint}?")
    return 0


if __name__ == "__main__":
    sys.exit(main())
