"""CUB-200-2011 as extracted: images/<class>/<image>.jpg and the id tables images.txt,
train_test_split.txt, image_class_labels.txt, classes.txt and bounding_boxes.txt.
"""
from pathlib import Path

from cmal.datasets.boxes import box_from_size
from cmal.datasets.records import Item, PrepareError
from cmal.datasets.sources import folder_names, numbers, read_table, require, unrecognised

CUB_FILES = {"images": "images.txt", "split": "train_test_split.txt",
             "labels": "image_class_labels.txt", "classes": "classes.txt"}
CUB_BOXES = "bounding_boxes.txt"


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
