"""A dataset folder's scan and checks: the train/test (and val) class-folder layout, the files
each class holds, and the images' headers or decodes checked before a run. Used by the
loaders (data.build_loaders) and cmal.tools.check_data.
"""
import errno
import os
import warnings
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from cmal.errors import UserError
from cmal.images import BadImageError, check_header, is_image_file, load_rgb

SPLITS = ("train", "test")
VAL_SPLIT = "val"  # optional: data_path/val/<class>/, used by --val_split=folder


class DatasetError(UserError, ValueError):
    """A dataset folder that cannot be used as it is; the message says what to fix."""


def class_folders(split_dir):
    return sorted(e.name for e in os.scandir(split_dir)
                  if _is_folder(e) and not e.name.startswith("."))


def _is_folder(entry):
    """entry.is_dir(), and False for a link that cannot be followed (a link cycle)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _unfollowable(exc):
    """Why a link is skipped, from the error of following it."""
    if exc.errno == errno.ELOOP:
        return "a link cycle (links that lead to each other, or to themselves)"
    return f"a link that cannot be followed ({exc.strerror})"


def _broken_links(split_dir):
    """(path, why) of the entries of a split folder that are links that cannot be followed: no
    class folders, but worth a line in check_data."""
    found = []
    for entry in os.scandir(split_dir):
        try:
            entry.is_dir()
        except OSError as exc:
            found.append((entry.path, _unfollowable(exc)))
    return sorted(found)


def _inside(path, folder):
    return os.path.commonpath([path, folder]) == folder


class _ClassFiles:
    """The files of one class folder, sorted, hidden entries left out.

    Links to files are followed (cmal.tools.prepare_data may link images to the download). Links to
    folders are followed only where they stay inside the class folder (the folder itself may be
    a link): one that leads out of it would label another folder's images with this class, and
    is skipped. Every file and folder is taken once by its real path, which also ends link loops.
    `images`: (path, real path) of image files; `others`: other regular files; `skipped`:
    (path, why) of the rest.
    """

    def __init__(self, folder):
        self.images, self.others, self.skipped = [], [], []
        self._base = os.path.realpath(folder)
        self._seen_dirs, self._seen_files = set(), {}
        self._walk(str(folder), self._base)

    def _walk(self, folder, real):
        self._seen_dirs.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            self.skipped.append((folder, f"cannot be listed ({exc.strerror})"))
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            target = os.path.realpath(entry.path)
            try:
                is_dir = entry.is_dir()  # follows links
            except OSError as exc:  # links that lead to each other (a -> b, b -> a)
                self.skipped.append((entry.path, _unfollowable(exc)))
                continue
            if is_dir:
                if entry.is_symlink() and not _inside(target, self._base):
                    self.skipped.append((entry.path, f"a link to {target}, outside its class "
                                                     f"folder {self._base}; it is not followed"))
                elif target in self._seen_dirs:
                    self.skipped.append((entry.path, f"a link back to {target}, already scanned "
                                                     "(a link loop or a second path to it)"))
                else:
                    self._walk(entry.path, target)
            else:
                self._add_file(entry, target)

    def _add_file(self, entry, target):
        if target in self._seen_files:
            self.skipped.append((entry.path, f"the same file as {self._seen_files[target]}, "
                                             "counted once"))
            return
        self._seen_files[target] = entry.path
        try:
            regular = entry.is_file()  # follows links; False for FIFOs, devices, dangling links
        except OSError:
            regular = False
        if not regular:
            self.skipped.append((entry.path, "not a regular file (a FIFO, device, socket or "
                                             "dangling link); only regular files are read"))
        elif is_image_file(entry.name):
            self.images.append((entry.path, target))
        else:
            self.others.append(entry.path)


class Layout:
    """What a dataset folder holds: class names, samples per split, and its layout problems."""

    def __init__(self, root, num_classes=None, with_val=True):
        self.root = Path(root)
        self.with_val = with_val  # scan and check root/val/ too, where it exists
        self.classes = []
        self.samples = {split: [] for split in SPLITS}
        self.ignored = []  # files in class folders that are not images
        self.skipped = []  # (path, why): links not followed, duplicates, non-regular files
        self.problems = []
        self.warnings = []  # what works here but not everywhere: class names equal but for case
        self._scan(num_classes)

    def _scan(self, num_classes):
        root = self.root
        layout = (f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image> "
                  "(python -m cmal.tools.prepare_data converts the official downloads to it)")
        if not root.is_dir():
            self.problems.append(f"data path {root} does not exist or is not a folder; set "
                                 f"data_path in the script's settings or pass --data_path=... "
                                 f"({layout})")
            return
        if root.name in (*SPLITS, VAL_SPLIT) and not any((root / s).is_dir() for s in SPLITS) \
                and all((root.parent / s).is_dir() for s in SPLITS):
            self.problems.append(f"data path {root} is the '{root.name}' folder of a dataset, "
                                 f"not the dataset: pass --data_path={root.parent} ({layout})")
            return
        inner = _dataset_inside(root)
        if inner is not None:
            self.problems.append(f"data path {root} holds no train/test folders but its folder "
                                 f"{inner.name} does: pass --data_path={inner} ({layout})")
            return
        names = {}
        for split in SPLITS:
            if (root / split).is_dir():
                self.skipped += _broken_links(root / split)
            if not (root / split).is_dir():
                self.problems.append(f"{root} has no '{split}' folder: {layout}")
            elif not class_folders(root / split):
                self.problems.append(f"{root / split} holds no class folders: {layout}")
            else:
                names[split] = class_folders(root / split)
        if len(names) < len(SPLITS):
            return
        if names["train"] != names["test"]:
            only_train = sorted(set(names["train"]) - set(names["test"]))
            only_test = sorted(set(names["test"]) - set(names["train"]))
            self.problems.append(
                f"train and test of {root} list different classes: only in train: "
                f"{some_names(only_train)}; only in test: {some_names(only_test)}. Both splits must hold "
                "the same class folders.")
            return
        self.classes = names["train"]
        self.warnings += _case_collisions(root / "train", self.classes)
        splits = SPLITS
        if self.with_val and (root / VAL_SPLIT).is_dir():
            splits += (VAL_SPLIT,)
            self.samples[VAL_SPLIT] = []
            if class_folders(root / VAL_SPLIT) != self.classes:
                self.problems.append(
                    f"{root / VAL_SPLIT} does not hold the class folders of {root}/train; a "
                    "validation folder needs the same classes (or remove it)")
                return
        if num_classes is not None and len(self.classes) != num_classes:
            self.problems.append(
                f"{root}/train has {len(self.classes)} class folders but num_classes is "
                f"{num_classes}; fix the data or pass --num_classes={len(self.classes)}")
        for split in splits:
            empty = []
            owner = {}  # real path of each image -> its class folder, for files linked twice
            for target, name in enumerate(self.classes):
                found = _ClassFiles(root / split / name)
                self.ignored += found.others
                self.skipped += found.skipped
                for path, real in found.images:
                    if real in owner:
                        self.problems.append(
                            f"{path} is the same file as {owner[real]} (linked into two class "
                            "folders): its label is ambiguous; keep one of them")
                        continue
                    owner[real] = path
                    self.samples[split].append((path, target))
                if not found.images:
                    empty.append(name)
            if empty:
                self.problems.append(
                    f"{root / split} has class folders with no image files: {some_names(empty)}; add "
                    "images or remove the class from both splits (image extensions: "
                    f"{', '.join(IMG_EXTENSIONS)})")


def _dataset_inside(root):
    """The one subfolder of `root` holding train/ and test/ where `root` holds neither, else
    None: an archive unpacked into a folder of its own name (data/Food-11/Food-11/train)."""
    if any((root / s).is_dir() for s in SPLITS):
        return None
    try:
        found = [entry for entry in root.iterdir() if entry.is_dir()
                 and all((entry / s).is_dir() for s in SPLITS)]
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


def _case_collisions(folder, classes):
    """A warning per group of class names that differ only in case: distinct classes here, one
    folder on a case-insensitive filesystem (macOS, Windows), where a copy merges them."""
    groups = {}
    for name in classes:
        groups.setdefault(name.casefold(), []).append(name)
    return [f"{folder} holds class folders whose names differ only in case: {', '.join(same)}; "
            "a copy to a case-insensitive filesystem (macOS, Windows) would merge their images "
            "into one folder: rename them apart (in train and test)"
            for same in groups.values() if len(same) > 1]


def some_names(names, limit=10):
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def check_layout(root, num_classes=None, with_val=False):
    """Check `root`/train and `root`/test (and with `with_val` `root`/val, where it exists) as
    class folders; return (classes, samples per split).

    Raises DatasetError listing every layout problem, each naming the folder at fault and what
    to do.
    """
    layout = Layout(root, num_classes, with_val)
    if layout.problems:
        raise DatasetError("\n".join(layout.problems))
    if layout.ignored:
        warnings.warn(f"{len(layout.ignored)} files in {root} are not images and are ignored, "
                      f"e.g. {layout.ignored[0]} (python -m cmal.tools.check_data {root} lists them)")
    for warning in layout.warnings:
        warnings.warn(warning)
    if layout.skipped:
        path, why = layout.skipped[0]
        warnings.warn(f"{len(layout.skipped)} entries of {root} are skipped, e.g. {path}: {why} "
                      f"(python -m cmal.tools.check_data {root} lists them)")
    return layout.classes, layout.samples


CHECKS = ("headers", "full", "none")


def check_images(samples, max_pixels, skip_bad=False, split="test", how="headers"):
    """The samples whose files can be read: their headers (check_header, milliseconds each) or
    with how="full" whole decodes; a bad one raises BadImageError naming it, or with
    `skip_bad` is left out, with one warning for all."""
    if how == "none":
        return samples
    check = check_header if how == "headers" else load_rgb
    kept, bad = [], []
    for path, target in samples:
        try:
            check(path, max_pixels)
        except BadImageError as exc:
            if not skip_bad:
                raise BadImageError(f"{exc}. Found before training, while checking the {split} "
                                    "images; remove or replace the file (python -m cmal.tools.check_data "
                                    "lists every bad file), or pass --skip_bad_images") from None
            bad.append(str(exc))
            continue
        kept.append((path, target))
    if bad:
        warnings.warn(f"skipping {len(bad)} unreadable {split} images, e.g. {bad[0]}")
    return kept


