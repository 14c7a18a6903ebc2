"""List every problem of a dataset folder in one pass, before a long run meets them.

    python -m cmal.tools.check_data DATA_PATH [--num_classes=N] [--workers=4]

Checks the train/test class-folder layout, then decodes every image as training would. Prints
each problem with the file at fault, every entry the scan skips (links that leave their class
folder, link loops, files reached twice, FIFOs and other non-regular files), and a summary.
Exit status 1 when training would stop (layout problems or unreadable images) or class folders
differ only in case (one folder on a case-insensitive filesystem), 0 otherwise.
"""
import argparse
import sys
from multiprocessing import Pool

from PIL import Image

from cmal.folders import Layout
from cmal.images import BadImageError, allow_images_up_to, load_rgb
from cmal.errors import run_command


def _inspect(args):
    path, max_pixels = args
    try:
        img = load_rgb(path, max_pixels)
    except BadImageError as exc:
        return path, str(exc), None
    return path, None, min(img.size)


def run(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("data_path", help="dataset root holding train/<class>/ and test/<class>/")
    p.add_argument("--num_classes", type=int, default=None,
                   help="expected number of classes (none: whatever the folders hold)")
    p.add_argument("--workers", type=int, default=4, help="decoding processes")
    p.add_argument("--image_size", type=int, default=368, help="report images smaller than this")
    p.add_argument("--max_image_pixels", type=int, default=Image.MAX_IMAGE_PIXELS,
                   help="report images with more pixels (decompression bombs), as training does")
    args = p.parse_args(argv)

    allow_images_up_to(args.max_image_pixels)
    layout = Layout(args.data_path, args.num_classes)
    for problem in layout.problems:
        print(f"LAYOUT  {problem}")
    for warning in layout.warnings:
        print(f"CASE    {warning}")
    for path in layout.ignored:
        print(f"IGNORED {path}: not an image file (by extension); training skips it")
    for path, why in layout.skipped:
        print(f"SKIPPED {path}: {why}")
    jobs = [(path, args.max_image_pixels) for split in layout.samples
            for path, _ in layout.samples[split]]
    bad, small = 0, 0
    with Pool(max(args.workers, 1)) as pool:
        for _, error, side in pool.imap(_inspect, jobs, chunksize=16):
            if error:
                bad += 1
                print(f"BAD     {error}")
            elif side < args.image_size:
                small += 1
    print(f"{args.data_path}: {len(layout.classes)} classes, "
          + ", ".join(f"{len(v)} {k} images" for k, v in layout.samples.items())
          + f"; {len(layout.problems)} layout problems, {len(layout.warnings)} groups of "
          f"class names equal but for case, {bad} unreadable images, "
          f"{len(layout.ignored)} ignored files, {len(layout.skipped)} skipped entries (links, "
          f"duplicates, non-regular files), {small} images smaller than {args.image_size} px "
          "(upsampled by the resize, which is fine)")
    if layout.problems or layout.warnings or bad:
        print("Fix the lines above (or train with --skip_bad_images to skip unreadable images).")
        return 1
    print("OK")
    return 0


def main(argv=None):
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
