"""Data of CMAL-Net as a run reads it: transforms, the dataset and its resumable sampler, the
validation hold-out and the loaders of each split (the folder scan is folders.py, image
decoding images.py).

Augmentation is reproducible by construction: the sampler hands each sample a seed derived from
(run seed, epoch, position), and the dataset seeds the transform with it. The data of an epoch
is thus the same whatever the number of workers or processes, and an interrupted epoch can be
resumed at any batch.
"""
import hashlib
import signal
import warnings
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from cmal.folders import VAL_SPLIT, DatasetError, some_names, check_images, check_layout
from cmal.images import BadImageError, allow_images_up_to, load_rgb


def val_fraction(cfg):
    """The fraction of train --val_split holds out, or None (no split, or the val/ folder)."""
    return None if cfg.val_split in ("none", "folder") else float(cfg.val_split)


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
                f"renamed); new since: {len(new)}; classes: {some_names(classes)}")
    return (f"held out then, not now: {len(gone)} of {len(saved['held'])} (removed, renamed, "
            f"or to be trained on); held out now, not then: {len(new)} (added, or trained on "
            f"until now); classes: {some_names(classes)}")


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
