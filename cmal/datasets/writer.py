"""The one writer: the checks made before anything is written, then every item written below OUT
as a hard link to its source, a symbolic link or a copy (as the file systems allow), or as a new
file (images held in memory; FGVC-Aircraft images less their copyright banner), by a pool of
threads. OUT is built under a temporary name and renamed at the end, so it is either complete or
absent; the items' boxes go to OUT/boxes.csv (cmal.datasets.boxes).
"""
import io
import os
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from PIL import Image, JpegImagePlugin

from cmal.datasets.boxes import BOXES_FILE, box_problem, clip_box, write_boxes
from cmal.datasets.records import Blob, PrepareError, some
from cmal.errors import disk_full_cause, write_error

AIRCRAFT_BANNER = 20  # pixel rows of copyright text at the bottom of every FGVC-Aircraft image


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
        if disk_full_cause(exc):
            raise unfinished(dest, disk_full_cause(exc)) from None
        raise PrepareError(f"cannot write {item.source} to {dest}: {exc}") from None


def unfinished(path, cause):
    """The error of a full disk met writing `path` below the output being built (which build
    then removes)."""
    return write_error(path, cause, "the partial output is removed (the source is untouched)")


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
            try:
                write_boxes(partial / BOXES_FILE, boxes)
            except OSError as exc:
                if disk_full_cause(exc) is None:
                    raise
                raise unfinished(partial / BOXES_FILE, disk_full_cause(exc)) from None
        if out.exists():
            out.rmdir()  # empty, as checked before
        partial.rename(out)
    except BaseException:
        # Removes links, never their targets: the source is unaffected.
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return how, len(boxes)
