"""Watch CMAL-Net learn on the CPU in a few minutes.

Generates (once, deterministically) a small fine-grained dataset in the train/test class-folder
layout, then trains a reduced CMAL-Net on it through the same engine as the dataset scripts.
Each image shows one "bird" on a cluttered background; all classes share the body, and differ
only by a small mark on the head (its shape and colour: a yellow plus, a red cross, a blue ring,
a white bar, black dots or a magenta triangle, 10 to 15% of the image side), at a position, scale
and orientation that vary from image to image, among clutter of every colour. Telling the classes
apart means finding that small region: what the attention crops are for.

    python -m cmal.tools.demo                 # generate data/demo if needed, then train
    python -m cmal.tools.demo --epochs=20     # any train.py setting can be overridden
    python -m cmal.tools.demo --compare       # CMAL-Net, the baseline and an ablation over 3
                                              # seeds, and a table (cmal/tools/demo_compare.py)
    python -m cmal.tools.demo --variant=fine  # the variant where only zooming in tells the
                                              # classes apart (data/demo_fine, FINE below)

Both variants write DATA/boxes.csv beside the images (cmal/datasets/boxes.py's format): each
image's mark box, the annotated part that evaluation's attention localisation is measured
against (cmal/localisation.py).
"""
import math
import sys
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image, ImageDraw

from cmal import settings
from cmal import train
from cmal.datasets.boxes import BOXES_FILE, write_boxes

DATA = Path("data") / "demo"  # beside the run folder, in the working folder
MARKS = ("plus", "cross", "ring", "bar", "dots", "triangle")
# The colour of each class's mark, in the order of MARKS. In the runs tried with the shape alone
# (one colour for all, lr 0.01-0.02) the reduced network stayed near chance for the first epochs;
# with colours too, it passes 85% test accuracy within four or five epochs.
MARK_COLORS = ((250, 220, 30), (230, 30, 30), (40, 70, 240), (255, 255, 255), (10, 10, 10),
               (240, 40, 240))
MARK_SCALE = 0.75  # mark radius relative to the head radius
BODY = (12, 18)  # range of the body half-length at 96 px (scaled with IMAGE_SIZE)
IMAGE_SIZE = 96
TRAIN_PER_CLASS = 200
TEST_PER_CLASS = 50
# Bump when the images change, so old copies are regenerated. "4": the same images as "3",
# with boxes.csv.
GENERATOR_VERSION = "4"

# The reduced network and schedule of the demo; any of these can be overridden on the command line.
SETTINGS = dict(
    data_path=str(DATA),
    num_classes=len(MARKS),
    epochs=8,
    batch_size=16,
    test_batch_size=20,
    workers=0,
    output_dir="Results_demo",
    overwrite=True,  # each `make demo` is a new run
    weights="",
    lr=0.005,  # from scratch: the backbone learns at the heads' rate
    backbone_lr=0.005,
    image_size=IMAGE_SIZE,
    resize=104,
    crop_padding=4,
    eval_every=1,
    layers="1,1,1,1",
    width_factor=0.25,
    head_mid=64,
    head_features=128,
    head_hidden=64,
)


class Variant(NamedTuple):
    """One generated dataset and the settings the demo trains on it with."""
    name: str
    data: Path
    marks: tuple
    colors: tuple  # of each mark, in the order of `marks`
    mark_scale: float  # mark radius relative to the head radius
    avoid: Optional[tuple]  # a colour the clutter keeps away from (None: any colour)
    train_per_class: int
    test_per_class: int
    version_suffix: str  # of the generation stamp
    settings: dict
    compare: dict  # the defaults of `demo --compare` (demo_compare.parse)


DEFAULT = Variant("default", DATA, MARKS, MARK_COLORS, MARK_SCALE, None, TRAIN_PER_CLASS,
                  TEST_PER_CLASS, "", SETTINGS,
                  dict(methods="cmal,baseline,no_crops", compare_dir="Results_demo_compare",
                       equal_steps=False))

# The fine variant: four classes told apart by the shape of a small mark of one colour (yellow,
# a colour the clutter avoids, so that the mark is easy to find and hard to read). Its radius is
# half the head's (3.3 to 5 px: a 7 to 10 px mark on a 96 px image, about one cell of layer2's
# 12 x 12 map). At 0.4 (5 to 8 px) CMAL-Net stayed at chance for three epochs (lr 0.005); README
# "Does the attention find the part that matters?" gives what was measured.
FINE_DATA = Path("data") / "demo_fine"
FINE_MARKS = ("plus", "cross", "ring", "triangle")
FINE = Variant(
    "fine", FINE_DATA, FINE_MARKS, ((250, 220, 30),) * len(FINE_MARKS), 0.5, (250, 220, 30),
    200, 50, "-fine2",
    # lr 0.01: the shape alone is learnt more slowly than the default demo's colours.
    dict(SETTINGS, data_path=str(FINE_DATA), num_classes=len(FINE_MARKS), epochs=10, lr=0.01,
         backbone_lr=0.01, output_dir="Results_demo_fine"),
    dict(methods="cmal,no_crops,no_joint_crop,baseline", compare_dir="Results_demo_fine_compare",
         equal_steps=True))
VARIANTS = {v.name: v for v in (DEFAULT, FINE)}


def _clutter(draw, rng, size, avoid=None):
    """Random rectangles, ellipses and lines; with `avoid`, no colour near that one (the fine
    variant's mark colour stays unique, so that finding the mark is easy and reading it is not)."""
    for _ in range(rng.integers(18, 30)):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        if avoid is not None and sum(abs(a - b) for a, b in zip(color, avoid)) < 200:
            color = tuple(255 - c for c in color)  # the opposite colour: far from `avoid`
        x0, y0 = rng.integers(-10, size, 2)
        w, h = rng.integers(4, size // 3, 2)
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=color)
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=color)
        else:
            draw.line([x0, y0, x0 + w, y0 + h], fill=color, width=int(rng.integers(1, 4)))


def _mark(draw, kind, cx, cy, r, angle, color):
    """A small class mark of radius r centred at (cx, cy), rotated by `angle`."""
    def rot(px, py):
        c, s = math.cos(angle), math.sin(angle)
        return cx + px * c - py * s, cy + px * s + py * c
    w = max(1, round(r / 2.5))
    if kind == "plus":
        draw.line([rot(-r, 0), rot(r, 0)], fill=color, width=w)
        draw.line([rot(0, -r), rot(0, r)], fill=color, width=w)
    elif kind == "cross":
        d = r * 0.8
        draw.line([rot(-d, -d), rot(d, d)], fill=color, width=w)
        draw.line([rot(-d, d), rot(d, -d)], fill=color, width=w)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=w)
    elif kind == "bar":
        draw.polygon([rot(-r, -r / 3), rot(r, -r / 3), rot(r, r / 3), rot(-r, r / 3)], fill=color)
    elif kind == "dots":
        for sx in (-1, 1):
            px, py = rot(sx * r * 0.6, 0)
            draw.ellipse([px - r / 2.5, py - r / 2.5, px + r / 2.5, py + r / 2.5], fill=color)
    elif kind == "triangle":
        draw.polygon([rot(0, -r), rot(r * 0.9, r * 0.6), rot(-r * 0.9, r * 0.6)], fill=color)


def render(kind, rng, size=None, variant=None, with_mark=True):
    """(image, mark box) of class `kind`: clutter, a bird-like body, and the class mark on its
    head. The box (x0, y0, x1, y1, x1 and y1 exclusive) bounds the mark's drawn pixels.
    `with_mark=False` draws the same image without its mark (what the tests compare)."""
    variant = variant or DEFAULT
    size = size or IMAGE_SIZE
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(60, 200, 3)))
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, size, variant.avoid)
    body = int(rng.integers(round(BODY[0] * size / 96), round(BODY[1] * size / 96)))
    cx, cy = rng.integers(body + 8, size - body - 8, 2)
    heading = rng.uniform(0, 2 * math.pi)
    hx, hy = cx + 1.1 * body * math.cos(heading), cy + 1.1 * body * math.sin(heading)
    shade = int(rng.integers(90, 140))
    draw.ellipse([cx - body, cy - body * 0.7, cx + body, cy + body * 0.7], fill=(shade,) * 3,
                 outline=(20, 20, 20))
    head = body * 0.55
    draw.ellipse([hx - head, hy - head, hx + head, hy + head], fill=(shade + 20,) * 3,
                 outline=(20, 20, 20))
    color = variant.colors[variant.marks.index(kind)]
    r, angle = head * variant.mark_scale, rng.uniform(-0.3, 0.3)
    # The same strokes on a blank mask give the mark's exact pixels, hence its box.
    mask = Image.new("L", (size, size), 0)
    _mark(ImageDraw.Draw(mask), kind, hx, hy, r, angle, 255)
    if with_mark:
        _mark(draw, kind, hx, hy, r, angle, color)
    return img, mask.getbbox()


def make_dataset(root=None, seed=0, variant=None):
    """Write root/{train,test}/<mark>/*.jpg and root/boxes.csv (each image's mark box) once; a
    stamp records a complete generation."""
    variant = variant or DEFAULT
    root = Path(root or variant.data)
    stamp = root / ".complete"
    version = GENERATOR_VERSION + variant.version_suffix
    if stamp.exists() and stamp.read_text() == version:
        return root
    rng = np.random.default_rng(seed)
    boxes = {}
    for split, count in (("train", variant.train_per_class), ("test", variant.test_per_class)):
        for kind in variant.marks:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                img, box = render(kind, rng, variant=variant)
                name = f"{kind}_{i:03d}.jpg"
                img.save(folder / name, quality=95)
                boxes[f"{split}/{kind}/{name}"] = box
    write_boxes(root / BOXES_FILE, boxes)
    stamp.write_text(version)
    print(f"demo dataset ({variant.name}): {len(variant.marks)} classes, "
          f"{variant.train_per_class} train and {variant.test_per_class} test images each, "
          f"in {root}, mark boxes in {root / BOXES_FILE}")
    return root


def prepare_data(cfg):
    """Generate a demo dataset when the run reads it (not for another --data_path)."""
    for variant in VARIANTS.values():
        if Path(cfg.data_path) == variant.data:
            make_dataset(variant=variant)


def pop_variant(argv):
    """(the Variant named by --variant=NAME, default DEFAULT; argv without that option)."""
    names, rest = [], []
    for arg in argv:
        if arg.startswith("--variant="):
            names.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    if len(names) > 1 or (names and names[0] not in VARIANTS):
        sys.exit(f"--variant: expected one of {', '.join(VARIANTS)}, got "
                 f"{', '.join(names) or 'nothing'}")
    return VARIANTS[names[0] if names else "default"], rest


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    variant, argv = pop_variant(argv)
    if "--compare" in argv:
        from cmal.tools import demo_compare
        return demo_compare.main([a for a in argv if a != "--compare"], variant.settings,
                                 prepare_data, variant.compare)
    description = (__doc__.split("\n")[0] + " With --compare: CMAL-Net against the plain "
                   "fine-tuning baseline and ablations over seeds (--compare --help); with "
                   "--variant=fine: the variant that needs zooming in.")
    cfg = settings.parse(variant.settings, argv, description)  # --help and bad options first
    prepare_data(cfg)
    return train.main(variant.settings, argv, description=description)


if __name__ == "__main__":
    sys.exit(main())
