"""Data of CMAL-Net: the train/test class-folder layout, its checks, transforms and sampling.

Augmentation is reproducible by construction: the sampler hands each sample a seed derived from
(run seed, epoch, position), and the dataset seeds the transform with it. The data of an epoch
is thus the same whatever the number of workers or processes, and an interrupted epoch can be
resumed at any batch.
"""
import errno
import hashlib
import os
import re
import signal
import stat
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS

from cmal.errors import UserError

SPLITS = ("train", "test")
VAL_SPLIT = "val"  # optional: data_path/val/<class>/, used by --val_split=folder


class DatasetError(UserError, ValueError):
    """A dataset folder that cannot be used as it is; the message says what to fix."""


class BadImageError(UserError, OSError):
    """An image file that cannot be decoded."""

    def __init__(self, path, reason=None):
        # One-argument form: DataLoader workers re-raise exceptions from their message alone.
        super().__init__(str(path) if reason is None else f"{path}: {reason}")
        self.path = str(path)


def is_image_file(name):
    return name.lower().endswith(IMG_EXTENSIONS)


def _to_rgb(img):
    """RGB for every PIL mode: 16-bit and 32-bit integer images are scaled to 8 bits rather than
    clipped, and transparent images are composited onto white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode != "I" or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = (a - a.min()) / (np.ptp(a) or 1.0)
        img = Image.fromarray((a * 255.0 + 0.5).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_rgb(path, max_pixels=Image.MAX_IMAGE_PIXELS, draft_size=None):
    """Decode an image file fully into RGB, or raise BadImageError saying why not.

    Images above `max_pixels` are refused from their header, before any decoding. With
    `draft_size`, a JPEG is decoded directly at the smallest 1/2, 1/4 or 1/8 scale that keeps
    both sides at least `draft_size` (libjpeg's DCT scaling): several times faster for large
    photos, and close to, not equal to, resizing the full decode (bench.py --loader measures).
    """
    with _open_image(path, max_pixels) as img:
        try:
            if draft_size and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            img.load()  # decode now, so that a truncated file fails here and not later
            return _to_rgb(img)
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise BadImageError(path, f"not a readable image ({exc})") from None


def check_header(path, max_pixels=Image.MAX_IMAGE_PIXELS):
    """Raise BadImageError unless `path` is a regular file with an image header PIL can read
    and an allowed pixel count; nothing is decoded (milliseconds per file)."""
    with _open_image(path, max_pixels):
        pass


def _open_image(path, max_pixels):
    """Image.open of a regular file, refusing other files (a FIFO would block the reader
    forever) and images of more than `max_pixels` pixels, from the header."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise BadImageError(path, f"cannot be read ({exc.strerror})") from None
    if not stat.S_ISREG(mode):
        raise BadImageError(path, "not a regular file (a FIFO, device, socket or folder); only "
                                  "image files are read")
    try:
        with warnings.catch_warnings():
            # PIL's own guard, against a process-wide limit: it warns above Image.MAX_IMAGE_PIXELS
            # and fails above twice it. Ours, below, applies --max_image_pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as exc:
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(path, int(found.group(1)) if found else None, max_pixels) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise BadImageError(path, f"not a readable image ({exc})") from None
    if img.width * img.height > max_pixels:
        img.close()
        raise _too_large(path, img.width * img.height, max_pixels)
    return img


def _too_large(path, pixels, max_pixels):
    size = f"{pixels:,} pixels" if pixels else "too many pixels"
    return BadImageError(path, f"{size}, more than --max_image_pixels={max_pixels:,} (a guard "
                               "against decompression bombs); if the image is genuine, raise "
                               "--max_image_pixels")


def allow_images_up_to(max_pixels):
    """Let PIL open images of up to `max_pixels` pixels (its guard fails above twice its
    process-wide Image.MAX_IMAGE_PIXELS). Called once where a loader or tool is set up, never
    per image; it only ever raises PIL's limit."""
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


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
                f"{_some(only_train)}; only in test: {_some(only_test)}. Both splits must hold "
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
                    f"{root / split} has class folders with no image files: {_some(empty)}; add "
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


def _some(names, limit=10):
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


def val_fraction(cfg):
    """The fraction of train --val_split holds out, or None (no split, or the val/ folder)."""
    return None if cfg.val_split in ("none", "folder") else float(cfg.val_split)


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


def build_transforms(image_size=368, resize=421, crop_padding=8):
    """The reference TResNet-L transforms (368 px crops of 421 px resizes, normalised to [-1, 1])."""
    normalize = T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    train = T.Compose([
        T.Resize((resize, resize)),
        T.RandomCrop(image_size, padding=crop_padding),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        normalize,
    ])
    test = T.Compose([
        T.Resize((resize, resize)),
        T.CenterCrop(image_size),
        T.ToTensor(),
        normalize,
    ])
    return train, test


class ImageDataset(Dataset):
    """(path, target) samples with a transform; a key is an index or an (index, seed) pair."""

    def __init__(self, samples, classes, transform, skip_bad=False,
                 max_pixels=Image.MAX_IMAGE_PIXELS, draft_size=None, part_boxes=None):
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.skip_bad = skip_bad
        self.max_pixels = max_pixels
        self.draft_size = draft_size
        # localisation.PartBoxes: each sample then also yields its annotated box (test transform)
        self.part_boxes = part_boxes

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, target = self.samples[index]
        try:
            img = load_rgb(path, self.max_pixels, self.draft_size)
        except BadImageError as exc:
            if not self.skip_bad:
                raise BadImageError(f"{exc}. Remove or replace the file (python -m cmal.tools.check_data "
                                    "lists every bad file), or pass --skip_bad_images to skip "
                                    "such files with a warning") from None
            warnings.warn(f"skipping {exc}")
            return None
        part = () if self.part_boxes is None else \
            (self.part_boxes.in_crop(index, img.size, self.draft_size is not None),)
        if seed is None:
            return (self.transform(img), target, *part)
        # Seed a private copy of the CPU generator that torchvision's random transforms use.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            return (self.transform(img), target, *part)


def mix_seed(*parts):
    """A 63-bit seed from integers, stable across runs and platforms."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


class EpochSampler(Sampler):
    """Yields (index, seed) pairs; order and seeds depend only on (seed, epoch).

    With several processes, rank r takes every world_size-th sample. For training the list is
    first padded by repetition to a multiple of world_size, so that every rank runs the same
    number of steps; for evaluation it is not, so that every sample counts exactly once.
    `start` skips the first samples of this rank (resuming inside an epoch).
    """

    def __init__(self, num_samples, seed=0, shuffle=True, rank=0, world_size=1, pad=True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.pad = pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch, start=0):
        self.epoch = epoch
        self.start = start

    def _order(self):
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch, 1))
        order = torch.randperm(self.num_samples, generator=g) if self.shuffle \
            else torch.arange(self.num_samples)
        seeds = torch.randint(0, 2 ** 62, (self.num_samples,), generator=g)
        if self.pad and self.num_samples % self.world_size:
            extra = self.world_size - self.num_samples % self.world_size
            order = torch.cat([order, order[:extra]])
            seeds = torch.cat([seeds, seeds[:extra]])
        return order[self.rank::self.world_size], seeds[self.rank::self.world_size]

    def __iter__(self):
        order, seeds = self._order()
        return iter(zip(order[self.start:].tolist(), seeds[self.start:].tolist()))

    def __len__(self):
        n, w = self.num_samples, self.world_size
        per_rank = -(-n // w) if self.pad else len(range(self.rank, n, w))
        return max(per_rank - self.start, 0)


def collate_skipping(batch):
    """(inputs, targets, number of samples skipped as bad files), and where the dataset yields
    annotated boxes, a fourth item: their (B, 4) tensor (localisation.py)."""
    kept = [b for b in batch if b is not None]
    if not kept:
        return torch.empty(0), torch.empty(0, dtype=torch.long), len(batch)
    inputs, targets, *part = default_collate(kept)
    return (inputs, targets, len(batch) - len(kept), *part)


def shutdown_workers(*loaders):
    """End the loader processes now, also when their epoch was left midway by an error.

    A persistent DataLoader keeps its workers until its iterator is collected; they ignore
    SIGTERM (see _ignore_interrupts), so at interpreter exit multiprocessing would wait for them
    forever. Dropping the iterator asks them to stop; any that still run are killed.
    """
    for loader in loaders:
        iterator = getattr(loader, "_iterator", None)
        if iterator is None:
            continue
        loader._iterator = None
        workers = list(getattr(iterator, "_workers", []))
        iterator._shutdown_workers()
        for worker in workers:
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)


def _ignore_interrupts(worker_id):
    # Ctrl-C (or a SIGTERM to the process group) reaches the workers too; they must keep
    # serving batches while the main process finishes its iteration and saves
    # (train.StopRequest), which then shuts them down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


# How --val_split=F chooses its hold-out, recorded in the checkpoints. "ranked": each class's
# files ranked by a hash of (seed, path); "permutation": one seeded generator drawing a
# permutation per class in turn, as runs did before they recorded their hold-out (a resumed one
# keeps it). "folder": no hold-out; the record lists the images of --val_split=folder's val/.
HOLDOUT_RANKED, HOLDOUT_PERMUTATION, HOLDOUT_FOLDER = "ranked", "permutation", "folder"


def hold_out(samples, fraction, seed, root=None, method=HOLDOUT_RANKED):
    """(train, val): `fraction` of each class's samples held out for validation (rounded, at
    least one, and at least one left for training); each keeps the order of `samples`.

    Each class's choice depends only on its own files and the seed: every file is ranked by the
    SHA-256 of the seed and its path relative to `root` (train/), and the first of its class
    are held out. Adding, removing or renaming an image changes no other class's hold-out, the
    order the files were listed in changes nothing, and neither does moving the dataset."""
    members = {}
    for index, (_, target) in enumerate(samples):
        members.setdefault(target, []).append(index)
    held = set()
    draw = torch.Generator().manual_seed(mix_seed(seed, 0x7A1))  # "permutation" only
    for target in sorted(members):
        indices = members[target]
        if len(indices) < 2:
            raise DatasetError(f"the class of {samples[indices[0]][0]} has one training image: "
                               "--val_split needs two per class (one to train on, one to "
                               "validate); add images or use a val/ folder")
        count = min(max(1, round(fraction * len(indices))), len(indices) - 1)
        if method == HOLDOUT_PERMUTATION:
            ranked = [indices[i] for i in torch.randperm(len(indices), generator=draw).tolist()]
        else:
            ranked = sorted(indices, key=lambda i: _rank(seed, relative_path(samples[i][0], root)))
        held.update(ranked[:count])
    return ([s for i, s in enumerate(samples) if i not in held],
            [s for i, s in enumerate(samples) if i in held])


def relative_path(path, root):
    """`path` below `root` with / separators, as hold-outs are ranked and recorded."""
    return Path(path).relative_to(root).as_posix() if root is not None else Path(path).as_posix()


def _rank(seed, name):
    # surrogateescape: a file name that is not UTF-8 (Linux allows any bytes) ranks by its bytes
    return hashlib.sha256(f"{seed}/{name}".encode("utf-8", "surrogateescape")).digest(), name


def holdout_record(held, root, method):
    """What a checkpoint records of a run's hold-out: how it was drawn, and the relative paths
    of the held-out images, sorted."""
    return {"method": method, "held": sorted(relative_path(path, root) for path, _ in held)}


def holdout_method_of(checkpoint):
    """How a run resumed from `checkpoint` (None: a new run) draws its hold-out: as recorded;
    a checkpoint that records none was written by a run drawing "permutation"."""
    if checkpoint is None:
        return HOLDOUT_RANKED
    record = checkpoint.get("holdout")
    return record["method"] if record else HOLDOUT_PERMUTATION


def holdout_change(saved, now):
    """How the hold-out `now` differs from a checkpoint's record `saved`, in words, or None."""
    gone, new = set(saved["held"]) - set(now["held"]), set(now["held"]) - set(saved["held"])
    if not gone and not new:
        return None
    classes = sorted({name.split("/")[0] for name in gone | new})
    if now["method"] == HOLDOUT_FOLDER:
        return (f"validated on then, not now: {len(gone)} of {len(saved['held'])} (removed or "
                f"renamed); new since: {len(new)}; classes: {_some(classes)}")
    return (f"held out then, not now: {len(gone)} of {len(saved['held'])} (removed, renamed, "
            f"or to be trained on); held out now, not then: {len(new)} (added, or trained on "
            f"until now); classes: {_some(classes)}")


def split_samples(cfg, samples, holdout_method=HOLDOUT_RANKED):
    """The samples of each split this run uses: train and test, and with --val_split a
    validation split (held out from train, or data_path/val/); and the hold-out's record
    (holdout_record) or None."""
    splits, record = {"train": samples["train"], "test": samples["test"]}, None
    if cfg.val_split == "folder":
        if VAL_SPLIT not in samples:
            raise DatasetError(f"--val_split=folder but {cfg.data_path} has no '{VAL_SPLIT}' "
                               f"folder; add {cfg.data_path}/{VAL_SPLIT}/<class>/ or hold out a "
                               "part of train with --val_split=0.1")
        splits[VAL_SPLIT] = samples[VAL_SPLIT]
        record = holdout_record(splits[VAL_SPLIT], Path(cfg.data_path) / VAL_SPLIT,
                                HOLDOUT_FOLDER)
    elif val_fraction(cfg):
        root = Path(cfg.data_path) / "train"
        splits["train"], splits[VAL_SPLIT] = hold_out(samples["train"], val_fraction(cfg),
                                                      cfg.seed, root, holdout_method)
        record = holdout_record(splits[VAL_SPLIT], root, holdout_method)
    elif (Path(cfg.data_path) / VAL_SPLIT).is_dir():
        warnings.warn(f"{cfg.data_path}/{VAL_SPLIT} is not used: best.pt is chosen on test, as "
                      "the reference does; --val_split=folder chooses it on this folder")
    return splits, record


class Loaders(NamedTuple):
    train: DataLoader
    test: DataLoader
    classes: list
    val: Optional[DataLoader] = None  # with --val_split
    holdout: Optional[dict] = None  # with --val_split: holdout_record


def build_loaders(cfg, rank=0, world_size=1, pin_memory=False, holdout_method=HOLDOUT_RANKED):
    """The loaders of cfg.data_path's splits, checked first, the class names and the hold-out's
    record (`holdout_method`: see holdout_method_of)."""
    classes, samples = check_layout(cfg.data_path, cfg.num_classes,
                                    with_val=cfg.val_split == "folder")
    allow_images_up_to(cfg.max_image_pixels)
    splits, holdout = split_samples(cfg, samples, holdout_method)
    # Before training, so that an unreadable file stops the run in its first seconds and not at
    # its batch, or for the test split after a whole epoch.
    found = len(samples["train"])
    samples = {name: check_images(listed, cfg.max_image_pixels, cfg.skip_bad_images, name,
                                  cfg.check_images)
               for name, listed in splits.items()}
    if cfg.batch_size % world_size or cfg.batch_size // world_size < 2:
        raise DatasetError(f"batch_size={cfg.batch_size} must split into at least two samples "
                           f"for each of the {world_size} processes")
    train_tf, test_tf = build_transforms(cfg.image_size, cfg.resize, cfg.crop_padding)
    # Loaders get generators of their own: otherwise each epoch's iterator draws its worker
    # seed from the global generator, which also picks the crops (train_step), and a resumed
    # epoch would see another stream than an uninterrupted one.
    common = dict(num_workers=cfg.workers, collate_fn=collate_skipping, pin_memory=pin_memory,
                  persistent_workers=cfg.workers > 0, worker_init_fn=_ignore_interrupts)
    draft = cfg.resize if cfg.fast_decode else None
    train_set = ImageDataset(samples["train"], classes, train_tf, cfg.skip_bad_images,
                             cfg.max_image_pixels, draft)
    from cmal.localisation import part_boxes_of  # late: it imports the datasets package
    evaluated = {split: ImageDataset(samples[split], classes, test_tf, cfg.skip_bad_images,
                                     cfg.max_image_pixels, draft,
                                     part_boxes_of(samples[split], cfg))
                 for split in ("test", VAL_SPLIT) if split in samples}
    train = DataLoader(train_set, batch_size=cfg.batch_size // world_size, drop_last=True,
                       sampler=EpochSampler(len(train_set), cfg.seed, True, rank, world_size),
                       generator=torch.Generator().manual_seed(cfg.seed), **common)
    ordered = {split: DataLoader(dataset, batch_size=cfg.test_batch_size,
                                 sampler=EpochSampler(len(dataset), cfg.seed, False, rank,
                                                      world_size, pad=False),
                                 generator=torch.Generator().manual_seed(cfg.seed), **common)
               for split, dataset in evaluated.items()}
    if len(train) == 0:
        raise _too_few_to_train(cfg, found, len(splits["train"]), len(train_set))
    return Loaders(train, ordered["test"], classes, ordered.get(VAL_SPLIT), holdout)


def _too_few_to_train(cfg, found, after_hold_out, kept):
    """The DatasetError of a train split smaller than one batch, counting the images found, those
    --val_split holds out and those skipped as unreadable, so that the fix is plain."""
    held, skipped = found - after_hold_out, after_hold_out - kept
    fixes = (["--val_split"] if held else []) + ["--batch_size"]
    return DatasetError(
        f"{cfg.data_path}/train has {found} images"
        + (f", of which --val_split={cfg.val_split} holds out {held} for validation"
           if held else "")
        + (f", and {skipped} are skipped as unreadable" if skipped else "")
        + f": {kept} left to train on, fewer than one batch of {cfg.batch_size}; lower "
        + " or ".join(fixes) + ", or add images")
