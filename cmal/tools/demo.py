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
"""
import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cmal import settings
from cmal import train

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
GENERATOR_VERSION = "3"  # bump when the images change, so old copies are regenerated

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


def _clutter(draw, rng, size):
    for _ in range(rng.integers(18, 30)):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
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


def render(kind, rng, size=None):
    """One image of class `kind`: clutter, a bird-like body, and the class mark on its head."""
    size = size or IMAGE_SIZE
    img = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(60, 200, 3)))
    draw = ImageDraw.Draw(img)
    _clutter(draw, rng, size)
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
    color = MARK_COLORS[MARKS.index(kind)]
    _mark(draw, kind, hx, hy, head * MARK_SCALE, rng.uniform(-0.3, 0.3), color)
    return img


def make_dataset(root=DATA, seed=0):
    """Write root/{train,test}/<mark>/*.jpg once; a stamp records a complete generation."""
    root = Path(root)
    stamp = root / ".complete"
    if stamp.exists() and stamp.read_text() == GENERATOR_VERSION:
        return root
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for kind in MARKS:
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                render(kind, rng).save(folder / f"{kind}_{i:03d}.jpg", quality=95)
    stamp.write_text(GENERATOR_VERSION)
    print(f"demo dataset: {len(MARKS)} classes, {TRAIN_PER_CLASS} train and {TEST_PER_CLASS} test "
          f"images each, in {root}")
    return root


def prepare_data(cfg):
    """Generate the demo dataset when the run reads it (not for another --data_path)."""
    if Path(cfg.data_path) == DATA:
        make_dataset()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--compare" in argv:
        from cmal.tools import demo_compare
        return demo_compare.main([a for a in argv if a != "--compare"], SETTINGS, prepare_data)
    description = (__doc__.split("\n")[0] + " With --compare: CMAL-Net against the plain "
                   "fine-tuning baseline and ablations over seeds (--compare --help).")
    cfg = settings.parse(SETTINGS, argv, description)  # --help and bad options, before any work
    prepare_data(cfg)
    return train.main(SETTINGS, argv, description=description)


if __name__ == "__main__":
    sys.exit(main())
