"""HuggingFace parquet exports of any of the datasets: *.parquet files whose names or folders say
the split, an image column and a class column. Reading them needs pyarrow (an optional
dependency, imported when used); boxes are not read from them.
"""
import io
import json
import re
from collections import Counter
from pathlib import Path

from PIL import Image

from cmal.datasets.records import Blob, Item, PrepareError, some
from cmal.datasets.sources import IMAGE_EXTENSIONS, folder_name, folder_names

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


def plan_parquet(files, args, crop):
    """Items of a parquet export; its images are held in memory (about the size of its files)
    until they are written. `crop`: the images will be cut (FGVC-Aircraft's banner), and so
    written as JPEG files."""
    src = args.src
    rows, names = read_parquet_splits(files, src, args)
    namer = class_namer([label for split in rows.values() for label, _, _ in split], names, src)
    folders = folder_names(namer(label) for split in rows.values() for label, _, _ in split)
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
