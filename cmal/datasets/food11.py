"""Food-11: training/ (-> train), validation/ (-> where --validation_to says) and evaluation/
(-> test), each holding <class index>_<n>.jpg files (the official copy) or one folder per class.
"""
import re

from cmal.datasets.records import Item, PrepareError, some
from cmal.datasets.sources import class_folder_items, is_image, unrecognised, visible_entries

FOOD11_CLASSES = ("Bread", "Dairy product", "Dessert", "Egg", "Fried food", "Meat",
                  "Noodles-Pasta", "Rice", "Seafood", "Soup", "Vegetable-Fruit")
FOOD11_FLAT_NAME = re.compile(r"(\d+)_\d+\.\w+")  # <class index>_<n>.jpg
FOOD11_UNLABELLED_NAME = re.compile(r"\d+\.\w+")  # <n>.jpg: no class index
# Validation images are prefixed so that they cannot collide with training or evaluation images,
# which reuse the same <class index>_<n> names.
FOOD11_VALIDATION_PREFIX = "validation_"


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
