"""The fine demo seen through a perfect zoom: a probe of whether its classes need one.

    python -m cmal.tools.demo_oracle [SOURCE=data/demo_fine] [OUT=data/demo_fine_oracle]

Writes a copy of SOURCE (the train/test class folders and boxes.csv of `demo --variant=fine`)
in which every image is cropped to a square around its annotated mark (ORACLE_SCALE times the
mark's longer side, at least MIN_SIDE px, kept inside the image) and resized back to the image
size: what an attention crop that found the mark exactly would show. Training the same network
on it and on SOURCE, for the same steps, measures what zooming in is worth on this data,
independently of whether CMAL-Net's attention finds the mark (docs/evidence.md, "Does the
attention find the part that matters?").
"""
import argparse
import sys
from pathlib import Path

from PIL import Image

from cmal.errors import UserError, run_command

from cmal.datasets.boxes import BOXES_FILE, read_boxes

ORACLE_SCALE = 3
MIN_SIDE = 24


def oracle_square(box, width, height):
    """(x0, y0, x1, y1) of the square crop around `box`, inside a width x height image."""
    side = min(max(MIN_SIDE, ORACLE_SCALE * max(box.x1 - box.x0, box.y1 - box.y0)), width, height)
    cx, cy = (box.x0 + box.x1) / 2, (box.y0 + box.y1) / 2
    x0 = round(min(max(cx - side / 2, 0), width - side))
    y0 = round(min(max(cy - side / 2, 0), height - side))
    return x0, y0, x0 + round(side), y0 + round(side)


def make_oracle(source, out):
    source, out = Path(source), Path(out)
    boxes = read_boxes(source / BOXES_FILE)
    for key, box in sorted(boxes.items()):
        with Image.open(source / key) as img:
            crop = img.crop(oracle_square(box, img.width, img.height)).resize(
                img.size, Image.BILINEAR)
        (out / key).parent.mkdir(parents=True, exist_ok=True)
        crop.save(out / key, quality=95)
    print(f"{len(boxes)} images of {source} cropped to their marks in {out}")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("source", nargs="?", default="data/demo_fine",
                   help="a dataset folder with a boxes.csv (default: the fine demo's)")
    p.add_argument("out", nargs="?", default="data/demo_fine_oracle",
                   help="where the cropped copy goes")
    return p.parse_args(argv)


def run(argv=None):
    args = parse(argv)
    if not (Path(args.source) / BOXES_FILE).is_file():
        raise UserError(f"{args.source}/{BOXES_FILE} not found: generate the fine demo first "
                        "(python -m cmal.tools.demo --variant=fine generates it before it "
                        "trains), or pass the folder of a dataset with a boxes.csv")
    make_oracle(args.source, args.out)
    return 0


def main(argv=None):
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
