"""Stanford Cars, in any of the layouts it is distributed in: the devkit (cars_train/, cars_test/,
devkit/ and the separate cars_test_annos_withlabels.mat; Kaggle's nested copy too), torchvision's
root (stanford_cars/), car_ims/ with cars_annos.mat, or one folder per class. The MATLAB files
are read with scipy, imported when one is read.
"""
from pathlib import Path

from cmal.datasets.boxes import box_from_corners
from cmal.datasets.records import Item, PrepareError, some
from cmal.datasets.sources import (class_folder_items, first_existing, folder_names, require,
                                   unrecognised)

CARS_TEST_LABELS = "cars_test_annos_withlabels.mat"
# Browsers save a second download of the file as "cars_test_annos_withlabels (1).mat".
CARS_TEST_LABELS_GLOB = "cars_test_annos_withlabels*.mat"
CARS_ALL_ANNOTATIONS = "cars_annos.mat"  # beside car_ims/: every image's class, box and split
CARS_TEST_LABELS_WHERE = (
    "It is published as a separate file on the Kaggle dataset page \"Stanford Cars Dataset\" "
    "(jessicali9530/stanford-cars-dataset) and in other mirrors of Stanford Cars; torchvision's "
    "StanfordCars issue pytorch/vision#7545 on GitHub points to a copy.")

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
