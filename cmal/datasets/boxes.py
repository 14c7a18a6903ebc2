"""The boxes file, OUT/boxes.csv: the bounding boxes of the sources that have them (Stanford
Cars' annotation files, FGVC-Aircraft's images_box.txt, CUB's bounding_boxes.txt), written by
write_boxes and read by read_boxes.

    split,class,file,x0,y0,x1,y1
    train,Cessna 172,0001701.jpg,12,30,640,377      (an example)

one row per image that has a box: OUT/<split>/<class>/<file> is the image. Coordinates are in
pixels of that image, from its top-left corner, with pixel edges at integers: (x0, y0) is the
top-left corner of the first pixel inside the box (inclusive), (x1, y1) the bottom-right corner
of the last one (exclusive), so the box spans x1 - x0 columns and y1 - y0 rows: the box of
PIL's Image.crop and of array[y0:y1, x0:x1]. Numbers are integers where the source's are, else
decimals (CUB's). The sources' own conventions are converted: the 1-based inclusive xmin, ymin,
xmax, ymax of Stanford Cars (MATLAB files) and FGVC-Aircraft become xmin - 1, ymin - 1, xmax,
ymax (box_from_corners); CUB's x, y, width, height become x, y, x + width, y + height
(box_from_size). Aircraft boxes are clipped to the image left once the banner is cut off
(clip_box). Boxes are not read from parquet exports.

The training and evaluation read this file too, so this module imports only the standard
library (and cmal.errors): no numpy, Pillow, scipy, pyarrow or torch.
"""
import csv
import math
from collections import namedtuple
from pathlib import Path

from cmal.errors import UserError

BOXES_FILE = "boxes.csv"
BOX_COLUMNS = ("split", "class", "file", "x0", "y0", "x1", "y1")


class BoxesError(UserError, ValueError):
    """A boxes file (or box) that does not follow the format of BOXES_FILE."""


Box = namedtuple("Box", "x0 y0 x1 y1")


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
