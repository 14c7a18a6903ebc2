"""Attention localisation: do the attention crops land on the part that matters?

Measured against an annotated box per image (a dataset's boxes.csv, cmal/datasets/boxes.py: the
demo's mark, the object of Stanford Cars and FGVC-Aircraft, the bird of CUB), from the boxes the
crops actually use (cmal.utils.attention_box and highlight_box: theta 0.5, padding 0.1), for each
expert's crop and for the joint crop. For each:

- pointing: percentage of images whose crop box contains the centre of the annotated box;
- iou: mean intersection over union of the crop box and the annotated box;
- area: mean area of the crop box as a fraction of the image;
- whole: percentage of images whose crop is the whole image (the crops' fallback for an empty,
  non-finite or degenerate map, or a box that covers everything);

and a chance level for each: the same figures of a box of the same height and width placed
uniformly at random inside the image (CHANCE_DRAWS placements per image, from a generator of its
own, so that evaluation leaves the run's random stream alone).

Annotated boxes are in the original image's pixels; the loader maps them through the test
transform (box_in_crop) and yields them as a (B, 4) float tensor x0, y0, x1, y1 in the network
input's pixels, NaN where an image has none. Images without a box are left out of the figures;
a dataset without boxes reports no localisation at all (not zeros).
"""
import math
from pathlib import Path

import torch
from PIL import Image

from cmal.datasets.boxes import BOXES_FILE, read_boxes
from cmal.utils import attention_box, highlight_box

CROPS = ("expert1", "expert2", "expert3", "joint")
FIGURES = ("pointing", "iou", "area", "whole")
CHANCE_FIGURES = ("pointing", "iou")
CHANCE_DRAWS = 16
CHANCE_SEED = 0x10CA1
# Per crop: hits, IoU sum, area sum, whole-image count, chance hits, chance IoU sum; then the
# number of images with a box.
SUMS_PER_CROP = len(FIGURES) + len(CHANCE_FIGURES)
NUM_SUMS = len(CROPS) * SUMS_PER_CROP + 1


# ---- the annotated boxes, as the network input sees them -----------------------------------
def dataset_boxes(data_path):
    """{Path(split, class, file): Box} of data_path/boxes.csv, or None where there is none."""
    path = Path(data_path) / BOXES_FILE
    return read_boxes(path) if path.is_file() else None


def boxes_of_samples(samples, data_path, boxes):
    """Each sample's annotated box (or None), in the order of `samples` ((path, target) pairs);
    None when no sample has one."""
    root = Path(data_path)
    found = []
    for path, _ in samples:
        try:
            key = Path(path).relative_to(root)
        except ValueError:
            key = None
        found.append(boxes.get(key) if key is not None else None)
    return found if any(b is not None for b in found) else None


class PartBoxes:
    """The annotated boxes of a dataset's samples (in their order; None where one has none) and
    the test transform's geometry: what ImageDataset yields for each sample (in_crop)."""

    def __init__(self, samples, boxes, resize, image_size):
        self.paths = [path for path, _ in samples]
        self.boxes = boxes
        self.resize, self.image_size = resize, image_size

    def in_crop(self, index, loaded_size, drafted=False):
        """Sample `index`'s box as a float32 tensor (4,) in the network input's pixels, NaNs
        where it has none. `loaded_size`: the (width, height) decoded; with `drafted` (a JPEG
        decoded at a reduced scale, --fast_decode) the file's own size is read from its header,
        since the box is in the file's pixels."""
        box = self.boxes[index]
        width, height = loaded_size
        if box is not None and drafted:
            with Image.open(self.paths[index]) as img:
                width, height = img.size
        return torch.tensor(box_in_crop(box, width, height, self.resize, self.image_size),
                            dtype=torch.float32)


def part_boxes_of(samples, cfg):
    """The PartBoxes of `samples` from cfg.data_path/boxes.csv, or None where that file does not
    exist or boxes none of these samples."""
    boxes = dataset_boxes(cfg.data_path)
    if boxes is None:
        return None
    found = boxes_of_samples(samples, cfg.data_path, boxes)
    return None if found is None else PartBoxes(samples, found, cfg.resize, cfg.image_size)


def find_part_box(path, resize, image_size, levels=3):
    """The annotated box of image `path` in the network input's pixels (box_in_crop), from the
    boxes.csv of the nearest of its `levels` parent folders (root/split/class/file), or None."""
    path = Path(path)
    for root in list(path.resolve().parents)[:levels]:
        if (root / BOXES_FILE).is_file():
            box = read_boxes(root / BOXES_FILE).get(path.resolve().relative_to(root))
            if box is None:
                return None
            with Image.open(path) as img:
                found = box_in_crop(box, *img.size, resize, image_size)
            return None if math.isnan(found[0]) else found
    return None


def box_in_crop(box, width, height, resize, image_size):
    """(x0, y0, x1, y1) of `box` (pixels of a width x height image) after the test transform:
    Resize((resize, resize)), then CenterCrop(image_size) (torchvision's offset, rounded), clipped
    to the crop; NaNs where nothing of it is left (or there is no box)."""
    nan = (math.nan,) * 4
    if box is None:
        return nan
    offset = int(round((resize - image_size) / 2.0))
    sx, sy = resize / width, resize / height
    x0, x1 = (min(max(v * sx - offset, 0.0), image_size) for v in (box[0], box[2]))
    y0, y1 = (min(max(v * sy - offset, 0.0), image_size) for v in (box[1], box[3]))
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else nan


# ---- the metric -----------------------------------------------------------------------------
def crop_boxes(maps, size):
    """The crop boxes of the three experts and the joint crop, each (B, 4) as top, bottom, left,
    right (bottom and right exclusive): what the crops of training and evaluation use."""
    m1, m2, m3 = (m.detach() for m in maps)
    return [torch.stack(attention_box(m, size), 1) for m in (m1, m2, m3)] + \
        [torch.stack(highlight_box(m1, m2, m3, size), 1)]


def _overlap(a0, a1, b0, b1):
    return (torch.minimum(a1, b1) - torch.maximum(a0, b0)).clamp(min=0)


def box_figures(crop, part, size):
    """Per image: (contains the part's centre, IoU, area fraction, whole image) of crop boxes
    `crop` (B, 4: top, bottom, left, right) against parts `part` (B, 4: x0, y0, x1, y1), all
    float64, on a `size` (H, W) input."""
    H, W = size
    top, bottom, left, right = crop.double().unbind(1)
    x0, y0, x1, y1 = part.double().unbind(1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hit = (left <= cx) & (cx < right) & (top <= cy) & (cy < bottom)
    inter = _overlap(left, right, x0, x1) * _overlap(top, bottom, y0, y1)
    crop_area = (bottom - top) * (right - left)
    iou = inter / (crop_area + (x1 - x0) * (y1 - y0) - inter)
    whole = (top == 0) & (left == 0) & (bottom == H) & (right == W)
    return hit.double(), iou, crop_area / (H * W), whole.double()


def chance_figures(crop, part, size, generator):
    """Per image: the mean over CHANCE_DRAWS placements of (contains the centre, IoU) of a box
    of the crop's height and width placed uniformly at random inside the image."""
    H, W = size
    top, bottom, left, right = crop.long().unbind(1)
    h, w = bottom - top, right - left
    shape = (crop.shape[0], CHANCE_DRAWS)
    u = torch.rand((2, *shape), generator=generator, dtype=torch.float64).to(crop.device)
    # Uniform over the valid integer positions 0 .. H - h (and 0 .. W - w).
    new_top = (u[0] * (H - h + 1)[:, None]).floor().clamp(max=(H - h)[:, None])
    new_left = (u[1] * (W - w + 1)[:, None]).floor().clamp(max=(W - w)[:, None])
    boxes = torch.stack([new_top, new_top + h[:, None], new_left, new_left + w[:, None]], 2)
    parts = part[:, None, :].expand(*shape, 4)
    hit, iou, _, _ = box_figures(boxes.reshape(-1, 4), parts.reshape(-1, 4), size)
    return hit.view(shape).mean(1), iou.view(shape).mean(1)


def batch_sums(maps, part, size, generator):
    """The NUM_SUMS sums of one batch (float64, on the maps' device): per crop of CROPS, the
    FIGURES and CHANCE_FIGURES summed over the images with a box, then their number."""
    has = part.isfinite().all(1)
    part = torch.where(has[:, None], part.to(maps[0].device, torch.float64), 0.0)
    weight = has.double()
    sums = []
    for crop in crop_boxes(maps, size):
        sums += [(f * weight).sum() for f in box_figures(crop, part, size)]
        sums += [(f * weight).sum() for f in chance_figures(crop, part, size, generator)]
    return torch.stack(sums + [weight.sum()])


def chance_generator():
    """The generator of the chance boxes: the same placements at every evaluation."""
    return torch.Generator().manual_seed(CHANCE_SEED)


def summarise(sums):
    """The localisation record of NUM_SUMS summed values (a list), or None with no boxed image:
    {"images": n, crop: {figure: value}, "chance": {crop: {figure: value}}}; pointing and whole
    in percent, iou and area as fractions."""
    n = sums[-1]
    if not n:
        return None
    scale = {"pointing": 100.0, "whole": 100.0, "iou": 1.0, "area": 1.0}
    result, chance = {"images": int(n)}, {}
    for i, crop in enumerate(CROPS):
        own = sums[i * SUMS_PER_CROP:(i + 1) * SUMS_PER_CROP]
        result[crop] = {k: scale[k] * v / n for k, v in zip(FIGURES, own)}
        chance[crop] = {k: scale[k] * v / n
                        for k, v in zip(CHANCE_FIGURES, own[len(FIGURES):])}
    result["chance"] = chance
    return result


def describe(loc):
    """One line of a localisation record, for the epoch line and --test_only."""
    parts = [f"{crop} {loc[crop]['pointing']:.1f}%/{loc[crop]['iou']:.2f}/{loc[crop]['area']:.2f}"
             f" (chance {loc['chance'][crop]['pointing']:.1f}%/{loc['chance'][crop]['iou']:.2f})"
             for crop in CROPS]
    return (f"localisation on {loc['images']} annotated images, pointing/IoU/area: "
            + ", ".join(parts))
