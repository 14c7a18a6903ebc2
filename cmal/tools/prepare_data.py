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
images_box.txt, CUB's bounding_boxes.txt), are kept in OUT/boxes.csv; its format and coordinate
conventions are described in cmal.datasets.boxes.

This module is the command line: its arguments, which source module plans the items, and the
counts printed at the end. The conversion itself is in cmal.datasets (one module per source, one
writer).
"""
import argparse
import os
import sys
from collections import namedtuple
from pathlib import Path

from cmal.datasets.aircraft import plan_aircraft
from cmal.datasets.boxes import BOXES_FILE
from cmal.datasets.cars import CARS_TEST_LABELS, plan_cars
from cmal.datasets.cub import plan_cub
from cmal.datasets.food11 import plan_food11
from cmal.datasets.parquet import PARQUET_LABEL_COLUMNS, find_parquet_files, plan_parquet
from cmal.datasets.records import PrepareError
from cmal.datasets.writer import build, check_destination, check_items, without_bad_boxes
from cmal.errors import run_command

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
        return plan_parquet(parquet, args, dataset.crop), True
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
