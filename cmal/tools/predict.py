"""Classify images with a trained CMAL-Net: the top-k classes of each image by its combined score.

    python -m cmal.tools.predict CHECKPOINT IMAGE_OR_FOLDER [--topk 5] [--csv FILE] [--batch_size 8]

The score is the softmax of the combined logits: the four logits of the raw pass plus the four
of the pass on the joint attention crop, which is what evaluation ranks by (its "combined"
accuracy, the headline number); for a baseline run (--method=baseline), of its one head's logits.
Folders are searched recursively for image files. Images get the run's test-time preprocessing
(resize, centre crop, normalise). Exit status 0 on success, 2 when
the checkpoint or an image cannot be used (one line on stderr says which file and what to do).
"""
import csv
import sys

import torch

from cmal.distributed import pick_device
from cmal.engine import ranking_logits
from cmal.errors import run_command
from cmal.inference import (ToolError, batches, check_output, find_images, load_images, load_model,
                       tool_parser)


def parse_args(argv):
    p = tool_parser(
        "Print the top-k classes of each image by the combined score: the softmax of the summed "
        "logits of the raw pass and of the joint attention crop pass (expert 1, 2, 3 and concat "
        "each), which is what evaluation ranks by.")
    p.add_argument("--topk", type=int, default=5,
                   help="classes shown per image (at most the number of classes)")
    p.add_argument("--csv", default=None,
                   help="also write the results to this CSV file (columns path, rank, class, "
                        "score; k rows per image)")
    p.add_argument("--batch_size", type=int, default=8, help="images per forward pass")
    args = p.parse_args(argv)
    if args.topk < 1:
        p.error(f"--topk must be at least 1, got {args.topk}")
    if args.batch_size < 1:
        p.error(f"--batch_size must be at least 1, got {args.batch_size}")
    return args


def predict(model, cfg, paths, batch_size, topk, skip_bad=False):
    """Yield (path, [(class index, score), ...] best first) for every readable image."""
    device = next(model.parameters()).device
    for chunk in batches(paths, batch_size):
        inputs, kept = load_images(chunk, cfg, skip_bad)
        if inputs is None:
            continue
        probs = torch.softmax(ranking_logits(model, inputs.to(device)), 1).cpu()
        values, indices = probs.topk(topk, dim=1)
        for path, v, i in zip(kept, values.tolist(), indices.tolist()):
            yield path, list(zip(i, v))


def run(args):
    device = pick_device(args.device)
    paths = find_images(args.images)
    if args.csv:
        check_output(args.csv, [args.checkpoint, *paths], args.overwrite, "--csv")
    model, classes, cfg = load_model(args.checkpoint, device, args.max_image_pixels)
    topk = min(args.topk, len(classes))
    out = None
    if args.csv:
        try:
            out = open(args.csv, "w", newline="")
        except OSError as exc:
            raise ToolError(f"cannot write --csv={args.csv} ({exc.strerror}); choose another "
                            "path") from None
    try:
        writer = csv.writer(out) if out else None
        if writer:
            writer.writerow(["path", "rank", "class", "score"])
        width = max(len(c) for c in classes)
        count = 0
        for path, ranked in predict(model, cfg, paths, args.batch_size, topk, args.skip_bad_images):
            count += 1
            print(path)
            for rank, (index, score) in enumerate(ranked, start=1):
                print(f"  {rank}. {classes[index]:<{width}}  {score:.4f}")
                if writer:
                    writer.writerow([str(path), rank, classes[index], f"{score:.6f}"])
    finally:
        if out:
            out.close()
    if not count:
        raise ToolError(f"no readable image among the {len(paths)} file(s) of {args.images}")
    print(f"{count} images classified with {args.checkpoint}"
          + (f"; results in {args.csv}" if args.csv else ""), file=sys.stderr)
    return 0


def main(argv=None):
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
