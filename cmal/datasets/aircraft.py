"""FGVC-Aircraft 2013b as extracted: data/images/<id>.jpg, the images_variant_{trainval,test}.txt
lists (trainval -> train) and images_box.txt. The variant (100 classes) is the class. The
copyright banner at the bottom of every image is cut off by the writer (cmal.datasets.writer).
"""
from cmal.datasets.boxes import box_from_corners
from cmal.datasets.records import Item, PrepareError
from cmal.datasets.sources import folder_names, numbers, read_table, require, unrecognised

AIRCRAFT_LISTS = {"train": "images_variant_trainval.txt", "test": "images_variant_test.txt"}
AIRCRAFT_BOXES = "images_box.txt"


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
