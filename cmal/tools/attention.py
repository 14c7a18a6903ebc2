"""Draw what a trained CMAL-Net looks at: one PNG per image with the three experts' attention.

    python -m cmal.tools.attention CHECKPOINT IMAGE_OR_FOLDER [--out DIR] [--max_images N]

Each picture shows the input as the network sees it (the run's test-time resize and centre crop),
each expert's class activation map (for the class that expert predicts) as a heat map with the
box of its attention crop, the joint map and box of the three experts, the joint crop that the
second evaluation pass classifies, and the prediction of every head: expert 1, 2, 3, concat, and
the combined score that evaluation ranks by. Heat maps are upsampled bilinearly and min-max
normalised, as the attention crops compute them; boxes use theta 0.5 and padding 0.1. Where the
image's dataset has a boxes.csv (the demo's marks, Cars', Aircraft's or CUB's boxes), the
annotated box is drawn too, dashed, on the input and beside every crop box, and each crop's
title says whether it holds the annotated box's centre (cmal/localisation.py).
"""
import sys
import textwrap
from pathlib import Path

import torch
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cmal import methods
from cmal.distributed import pick_device
from cmal.scores import combined_scores
from cmal.errors import run_command
from cmal.inference import (ToolError, batches, check_output, find_images, load_images, load_model,
                       tool_parser)
from cmal.localisation import find_part_box
from cmal.utils import attention_box, highlight_box, joint_map, normalised_map

EXPERT_LAYERS = ("layer2", "layer3", "layer4")
BOX_COLOR = "#00ff66"
PART_COLOR = "#ff33cc"  # the annotated box


def parse_args(argv):
    p = tool_parser(
        "Write one PNG per image showing the input as the network sees it, each expert's "
        "attention heat map and crop box, the joint box and joint crop, and each head's "
        "predicted class (expert 1, 2, 3, concat, combined).")
    p.add_argument("--out", default="attention_maps", help="folder for the PNG files")
    p.add_argument("--max_images", type=int, default=20,
                   help="draw at most N images of a folder, spread evenly over its sorted list "
                        "(so every class folder tends to appear); 0: all")
    args = p.parse_args(argv)
    if args.max_images < 0:
        p.error(f"--max_images cannot be negative, got {args.max_images}")
    return args


def spread(items, n):
    """At most n items, evenly spaced over the list (first and last included)."""
    if not n or len(items) <= n:
        return list(items)
    if n == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)]


def output_names(paths, root):
    """A distinct PNG name per image: its path below `root` with '__' for '/', no extension."""
    root = Path(root)
    names, used = [], set()
    for path in paths:
        rel = path.relative_to(root) if root.is_dir() else Path(path.name)
        base = "__".join(rel.with_suffix("").parts) or "image"
        name, n = base, 1
        while name in used:
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        names.append(name + ".png")
    return names


def to_image(x):
    """A normalised (3, H, W) tensor back to an (H, W, 3) array in [0, 1]."""
    return (x.float() * 0.5 + 0.5).clamp(0, 1).permute(1, 2, 0).cpu().numpy()


def _prediction(logits, classes):
    p = torch.softmax(logits.float(), 0)
    i = int(p.argmax())
    return f"{classes[i]} ({p[i]:.2f})"


def _box(ax, box, color=BOX_COLOR, width=2.0, style="-"):
    top, bottom, left, right = (float(v) for v in box)
    # Pixel i covers [i - 0.5, i + 0.5] in imshow coordinates; the box ends are exclusive.
    rect = Rectangle((left - 0.5, top - 0.5), right - left, bottom - top, fill=False,
                     edgecolor=color, linewidth=width, linestyle=style)
    rect.set_path_effects([patheffects.Stroke(linewidth=width + 2, foreground="black"),
                           patheffects.Normal()])
    ax.add_patch(rect)


def _title(ax, text, width=42):
    lines = [textwrap.fill(line, width) for line in text.split("\n")]
    ax.set_title("\n".join(lines), fontsize=9)


def _panel(ax, image, heat=None, box=None, part=None):
    ax.imshow(image)
    if heat is not None:
        ax.imshow(heat, cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
    if part is not None:  # x0, y0, x1, y1 -> top, bottom, left, right
        _box(ax, (part[1], part[3], part[0], part[2]), PART_COLOR, 1.5, "--")
    if box is not None:
        _box(ax, box)
    ax.set_xticks([])
    ax.set_yticks([])


def _on_part(box, part):
    """", part centre in box" or ", part centre outside box" (nothing without a part box)."""
    if part is None:
        return ""
    top, bottom, left, right = (float(v) for v in box)
    cx, cy = (part[0] + part[2]) / 2, (part[1] + part[3]) / 2
    inside = left <= cx < right and top <= cy < bottom
    return ", part centre " + ("in box" if inside else "outside box")


def draw(path, image, crop, heats, boxes, joint_map, joint_box, heads, com, classes, map_sizes,
         label=None, part=None):
    """The figure of one image: arrays and tensors of that sample only, on the CPU. `heats` are
    the experts' normalised maps at image size, `map_sizes` their native resolutions; `part` the
    annotated box (x0, y0, x1, y1 in the input's pixels) or None."""
    fig = Figure(figsize=(10.5, 8.0), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    H, W = image.shape[:2]
    _panel(axes[0, 0], image, part=part)
    _title(axes[0, 0], f"input {W}x{H} as the network sees it"
                       + (" (dashed: annotated part)" if part is not None else "")
                       + f"\nconcat head: {_prediction(heads[3], classes)}")
    _panel(axes[0, 1], image, joint_map, joint_box, part)
    _title(axes[0, 1], f"joint map and box (experts 1+2+3){_on_part(joint_box, part)}\n"
                       f"com2 (4 heads, raw pass): {_prediction(sum(heads), classes)}")
    _panel(axes[0, 2], crop)
    _title(axes[0, 2], f"joint crop (second pass)\ncombined: {_prediction(com, classes)}")
    for i in range(3):
        ax = axes[1, i]
        _panel(ax, image, heats[i], boxes[i], part)
        _title(ax, f"expert {i + 1} ({EXPERT_LAYERS[i]}, {map_sizes[i]} map)"
                   f"{_on_part(boxes[i], part)}\n"
                   f"{_prediction(heads[i], classes)}")
    heading = f"{path}" + (f"   (folder label: {label})" if label else "")
    fig.suptitle(textwrap.fill(heading, 110), fontsize=10)
    fig.supxlabel(textwrap.fill(
        "heat maps: each expert's class activation map for the class it predicts, upsampled and "
        "min-max normalised (jet: blue low, red high); green boxes: attention crops (theta 0.5, "
        "padding 0.1); dashed magenta: the annotated part (boxes.csv), where there is one; "
        "scores: softmax of the head's logits, combined: of the 8 summed logits",
        150), fontsize=8, color="0.3")
    return fig


def render(model, classes, cfg, paths, names, out_dir, skip_bad=False, batch_size=8):
    """Write one PNG per readable image; yield each path written."""
    device = next(model.parameters()).device
    name_of = dict(zip(paths, names))
    for chunk in batches(paths, batch_size):
        inputs, kept = load_images(chunk, cfg, skip_bad)
        if inputs is None:
            continue
        inputs = inputs.to(device)
        s = combined_scores(model, inputs)
        size = inputs.shape[2:]
        heats = [normalised_map(a, size).cpu() for a in s.maps]
        joint = joint_map(*s.maps, size).cpu()
        boxes = [torch.stack(attention_box(a, size), 1).cpu() for a in s.maps]
        joint_boxes = torch.stack(highlight_box(*s.maps, size), 1).cpu()
        map_sizes = [f"{a.shape[1]}x{a.shape[2]}" for a in s.maps]
        for b, path in enumerate(kept):
            label = path.parent.name if path.parent.name in classes else None
            part = find_part_box(path, cfg.resize, cfg.image_size)
            fig = draw(path, to_image(inputs[b]), to_image(s.crop[b]),
                       [h[b].numpy() for h in heats], [bx[b] for bx in boxes], joint[b].numpy(),
                       joint_boxes[b], [h[b].cpu() for h in s.heads], s.com[b].cpu(), classes,
                       map_sizes, label, part)
            target = Path(out_dir) / name_of[path]
            try:
                fig.savefig(target)
            except OSError as exc:
                raise ToolError(f"cannot write {target} ({exc.strerror or exc}); choose another "
                                "--out folder") from None
            yield target


def run(args):
    device = pick_device(args.device)
    found = find_images(args.images)
    paths = spread(found, args.max_images)
    model, classes, cfg = load_model(args.checkpoint, device, args.max_image_pixels)
    if not methods.method_of(cfg).experts:
        raise ToolError(f"{args.checkpoint} holds the plain fine-tuning baseline "
                        "(--method=baseline): one head on global average pooling, no experts and "
                        "no attention maps to draw; pass a CMAL-Net checkpoint (python -m "
                        "cmal.tools.predict classifies images with either)")
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ToolError(f"cannot create --out={out_dir} ({exc.strerror}); choose another "
                        "folder") from None
    names = output_names(paths, args.images)
    for name in names:
        check_output(out_dir / name, [args.checkpoint, *found], args.overwrite, "--out")
    written = 0
    for target in render(model, classes, cfg, paths, names, out_dir, args.skip_bad_images):
        print(target, flush=True)
        written += 1
    if not written:
        raise ToolError(f"no readable image among {len(paths)} file(s) of {args.images}")
    if len(paths) < len(found):
        print(f"{written} of {len(found)} images drawn (--max_images={args.max_images}; 0 draws "
              "all)", file=sys.stderr)
    return 0


def main(argv=None):
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
