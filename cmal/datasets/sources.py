"""What the modules of the sources share to read a download: which files are images, the items
of a folder per class, whitespace-separated annotation tables, class names made folder names, and
the messages for a layout not recognised or a file missing.
"""
import math
import re

from cmal.datasets.records import Item, PrepareError

# The extensions torchvision's ImageFolder reads; other files are not images to the training.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Characters that cannot appear in a folder name here or on Windows, and control characters.
UNSAFE_CHARS = re.compile(r'[/\\:*?"<>|\x00-\x1f]')


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
