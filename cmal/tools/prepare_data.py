"""Turn the official download of a dataset into the layout the training scripts read.

    python -m cmal.tools.prepare_data aircraft SRC OUT [--copy]
    python -m cmal.tools.prepare_data cars     SRC OUT [--copy]
    python -m cmal.tools.prepare_data food11   SRC OUT [--copy] [--validation_to {train,test,val,skip}]

OUT receives train/<class>/<image> and test/<class>/<image>, with the same class folders in both
splits. The source is only read. Files are hard links to the source by default (symbolic links,
then copies, where linking fails); aircraft images are always new files, since their copyright
banner is cut off. OUT is built under a temporary name and renamed at the end, so it is either
complete or absent.
"""
import argparse
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

AIRCRAFT_LISTS = {"train": "images_variant_trainval.txt", "test": "images_variant_test.txt"}
AIRCRAFT_BANNER = 20  # pixel rows of copyright text at the bottom of every FGVC-Aircraft image

CARS_TEST_LABELS = "cars_test_annos_withlabels.mat"

FOOD11_CLASSES = ("Bread", "Dairy product", "Dessert", "Egg", "Fried food", "Meat",
                  "Noodles-Pasta", "Rice", "Seafood", "Soup", "Vegetable-Fruit")
FOOD11_FLAT_NAME = re.compile(r"(\d+)_\d+\.\w+")  # <class index>_<n>.jpg
# Validation images are prefixed so that they cannot collide with training or evaluation images,
# which reuse the same <class index>_<n> names.
FOOD11_VALIDATION_PREFIX = "validation_"

# Characters that cannot appear in a folder name here or on Windows, and control characters.
UNSAFE_CHARS = re.compile(r'[/\\:*?"<>|\x00-\x1f]')


class PrepareError(UserError):
    """A source or destination the converter cannot use; the message says what it expected."""


class Item(namedtuple("Item", "source split label name")):
    """One image to write: source path -> OUT/split/label/name."""

    @property
    def dest(self):
        return Path(self.split, self.label, self.name)


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
        f"data/images/<id>.jpg, data/{AIRCRAFT_LISTS['train']} and data/{AIRCRAFT_LISTS['test']}",
        candidates))


def read_aircraft_list(path):
    """[(image id, variant)] of an images_variant_*.txt; variants may contain spaces."""
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        image_id, _, variant = line.strip().partition(" ")
        if not variant.strip():
            raise PrepareError(f"{path}, line {number}: expected '<image id> <variant>', "
                               f"got {line!r}")
        pairs.append((image_id, variant.strip()))
    return pairs


def plan_aircraft(src, args):
    data = find_aircraft_data(src)
    lists = {split: data / name for split, name in AIRCRAFT_LISTS.items()}
    require([data / "images"], "image folder of FGVC-Aircraft")
    require(lists.values(), "FGVC-Aircraft annotation file")
    pairs = {split: read_aircraft_list(path) for split, path in lists.items()}
    folders = folder_names(variant for split in pairs.values() for _, variant in split)
    return [Item(data / "images" / f"{image_id}.jpg", split, folders[variant], f"{image_id}.jpg")
            for split, split_pairs in pairs.items() for image_id, variant in split_pairs]


# ---- Stanford Cars -----------------------------------------------------------------------------

def find_cars_class_folders(src):
    for root in (src, src / "car_data", src / "car_data" / "car_data"):
        if (root / "train").is_dir() and (root / "test").is_dir():
            return root
    return None


def plan_cars(src, args):
    root = find_cars_class_folders(src)
    if root is not None:
        return [item for split in ("train", "test")
                for item in class_folder_items(root / split, split)]
    devkit_markers = ["cars_train", "cars_test", "devkit", "car_devkit", CARS_TEST_LABELS]
    if any((src / marker).exists() for marker in devkit_markers):
        return plan_cars_devkit(src)
    raise PrepareError(unrecognised(
        "Stanford Cars", src,
        "either the devkit layout: cars_train/*.jpg, cars_test/*.jpg, devkit/cars_meta.mat, "
        f"devkit/cars_train_annos.mat and {CARS_TEST_LABELS} (at the top or in devkit/); "
        "or one folder per class: train/<class>/*.jpg and test/<class>/*.jpg (also accepted "
        "under car_data/ or car_data/car_data/ as in the Kaggle mirror)",
        [src, src / "car_data", src / "car_data" / "car_data"]))


def cars_image_folder(src, name):
    # Some mirrors nest the archive's folder in one of the same name (cars_train/cars_train/).
    nested = src / name / name
    return nested if nested.is_dir() else src / name


def load_mat_variable(path, key):
    """A variable of a MATLAB file as a 1-d array (scipy squeezes a 1-element array to a 0-d
    one, which would not iterate)."""
    # Imported here: only the cars devkit needs them, and scipy takes a while to load.
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


def read_cars_annotations(path, class_names):
    """[(file name, class name)] of a cars_*_annos*.mat, whose 'class' is 1-based."""
    annotations = load_mat_variable(path, "annotations")
    fields = annotations.dtype.names or ()
    if "fname" not in fields or "class" not in fields:
        raise PrepareError(
            f"{path} has no 'class' and 'fname' fields in 'annotations' (it has: {some(fields)}). "
            f"The test labels are in {CARS_TEST_LABELS}, a download separate from the devkit "
            "(devkit/cars_test_annos.mat has no labels).")
    pairs = []
    for record in annotations:
        number = int(record["class"])
        if not 1 <= number <= len(class_names):
            raise PrepareError(f"{path}: class {number} of {record['fname']} is outside "
                               f"1..{len(class_names)} (the classes of cars_meta.mat)")
        pairs.append((str(record["fname"]), class_names[number - 1]))
    return pairs


def plan_cars_devkit(src):
    devkit = first_existing([src / "devkit", src / "car_devkit" / "devkit"]) or src / "devkit"
    images = {"train": cars_image_folder(src, "cars_train"),
              "test": cars_image_folder(src, "cars_test")}
    meta = devkit / "cars_meta.mat"
    annos = {"train": devkit / "cars_train_annos.mat",
             "test": first_existing([src / CARS_TEST_LABELS, devkit / CARS_TEST_LABELS])}
    require(images.values(), "Stanford Cars image folder")
    require([meta, annos["train"]], "Stanford Cars devkit file")
    if annos["test"] is None:
        raise PrepareError(
            f"missing {CARS_TEST_LABELS} (looked in {src} and {devkit}): the test labels are a "
            "download separate from the devkit, whose cars_test_annos.mat has no labels")
    class_names = [str(name) for name in load_mat_variable(meta, "class_names")]
    folders = folder_names(class_names)
    return [Item(images[split] / fname, split, folders[name], fname)
            for split in ("train", "test")
            for fname, name in read_cars_annotations(annos[split], class_names)]


# ---- Food-11 -----------------------------------------------------------------------------------

def food11_flat_items(folder, split, prefix):
    """Items of a folder of <class index>_<n>.jpg files."""
    items, bad = [], []
    for f in filter(is_image, visible_entries(folder)):
        match = FOOD11_FLAT_NAME.fullmatch(f.name)
        if match is None or int(match[1]) >= len(FOOD11_CLASSES):
            bad.append(f.name)
        else:
            items.append(Item(f, split, FOOD11_CLASSES[int(match[1])], prefix + f.name))
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
        "<class index>_<n>.jpg files or one folder of images per class", candidates))


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
    absent = [i.source for i in items if not i.source.is_file()]
    if absent:
        raise PrepareError(f"{len(absent)} images listed by the annotations are missing: "
                           f"{some(absent)}")


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


def write_without_banner(source, dest):
    with Image.open(source) as img:
        if img.height <= AIRCRAFT_BANNER:
            raise PrepareError(f"{source} is only {img.height} px high, too small to hold the "
                               f"{AIRCRAFT_BANNER} px banner of FGVC-Aircraft images")
        kept = img.crop((0, 0, img.width, img.height - AIRCRAFT_BANNER))
        if kept.mode not in ("L", "RGB", "CMYK"):  # modes JPEG can hold
            kept = kept.convert("RGB")
        kept.save(dest, "JPEG", **jpeg_options(img))
    return "new files (banner cut off)"


def link_or_copy(source, dest, links_allowed):
    """Place `source` at `dest` as cheaply as the file systems allow; returns how."""
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
    dest = root / item.dest
    try:
        if crop:
            return write_without_banner(item.source, dest)
        return link_or_copy(item.source, dest, links_allowed)
    except PrepareError:
        raise
    # Unreadable image (Pillow raises OSError, SyntaxError or ValueError), full disk...: name
    # the file at fault.
    except (OSError, SyntaxError, ValueError) as exc:
        raise PrepareError(f"cannot write {item.source} to {dest}: {exc}") from None


def write_items(items, root, crop, links_allowed, workers):
    """Write every item below `root`; returns a Counter of how the files were written."""
    for folder in sorted({item.dest.parent for item in items}):
        (root / folder).mkdir(parents=True, exist_ok=True)
    how, step = Counter(), max(len(items) // 10, 1)
    # Threads suffice: Pillow releases the GIL while it decodes and encodes.
    with ThreadPoolExecutor(max(workers, 1)) as pool:
        futures = [pool.submit(place, item, root, crop, links_allowed) for item in items]
        try:
            for done, future in enumerate(as_completed(futures), 1):
                how[future.result()] += 1
                if crop and done % step == 0:
                    print(f"  {done}/{len(items)} images", flush=True)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return how


def build(items, out, crop, links_allowed, workers):
    """Write OUT under a temporary name next to it, then rename it: an interrupted run leaves no
    half-filled OUT that would look like a dataset."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f"{out.name}.incomplete-{os.getpid()}"
    partial.mkdir()
    try:
        how = write_items(items, partial, crop, links_allowed, workers)
        if out.exists():
            out.rmdir()  # empty, as checked before
        partial.rename(out)
    except BaseException:
        # Removes links, never their targets: the source is unaffected.
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return how


# ---- command line ------------------------------------------------------------------------------

Dataset = namedtuple("Dataset", "plan crop classes title")
DATASETS = {
    "aircraft": Dataset(plan_aircraft, True, 100, "FGVC-Aircraft 2013b"),
    "cars": Dataset(plan_cars, False, 196, "Stanford Cars"),
    "food11": Dataset(plan_food11, False, 11, "Food-11"),
}

EPILOG = """\
sources (SRC):
  aircraft  the extracted fgvc-aircraft-2013b folder, or its data/ subfolder: data/images/<id>.jpg,
            data/images_variant_trainval.txt (-> train), data/images_variant_test.txt (-> test).
            The 20-pixel copyright banner at the bottom of each image is cut off, so images are
            always written as new JPEG files.
  cars      either the devkit layout: cars_train/, cars_test/, devkit/cars_meta.mat,
            devkit/cars_train_annos.mat and cars_test_annos_withlabels.mat (top level or devkit/);
            or folders per class: train/<class>/ and test/<class>/ (also under car_data/car_data/).
  food11    the folder holding training/ (-> train), validation/ (-> train by default, see
            --validation_to) and evaluation/ (-> test), each holding <class index>_<n>.jpg files
            or one folder per class. Validation files get a "validation_" prefix.

Class names that contain '/' become folder names with '_' (e.g. F/A-18 -> F_A-18).
OUT must not exist or be empty. Files that are not images (by extension) are not carried over.

examples:
  python -m cmal.tools.prepare_data aircraft ~/Downloads/fgvc-aircraft-2013b data/Aircraft
  python -m cmal.tools.prepare_data cars ~/Downloads/stanford_cars data/Stanford_Cars
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
                   help="food11 only: where the validation images go (default: train; val: "
                        "OUT/val/, for training with --val_split=folder)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads writing images (default: number of CPUs)")
    return p.parse_args(argv)


def summary(items, out):
    parts = []
    for split in ("train", "test"):
        chosen = [i for i in items if i.split == split]
        parts.append(f"{split}: {len(chosen)} images, {len({i.label for i in chosen})} classes")
    return "; ".join(parts) + f" -> {out}"


def main(argv=None):
    args = parse_args(argv)
    dataset = DATASETS[args.dataset]
    return run_command(convert, dataset, args)


def convert(dataset, args):
    check_destination(args.src, args.out)
    items = dataset.plan(args.src, args)
    check_items(items)
    print(f"{dataset.title}: writing {len(items)} images to {args.out}", flush=True)
    how = build(items, args.out, dataset.crop, not args.copy, args.threads)
    print(summary(items, args.out))
    print("files: " + ", ".join(f"{n} {kind}" for kind, n in how.items()))
    found = len({i.label for i in items})
    if found != dataset.classes:
        print(f"note: {dataset.title} has {dataset.classes} classes, this source has {found}; "
              "is the download complete?")
    return 0


if __name__ == "__main__":
    sys.exit(main())
