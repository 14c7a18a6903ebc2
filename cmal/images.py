"""Image files decoded into RGB, and refused before decoding: what is not a regular file, what
PIL cannot read, and images of more pixels than --max_image_pixels (a guard against
decompression bombs). Used by the loaders, the scan's image checks and inference.
"""
import os
import re
import stat
import warnings

import numpy as np
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from cmal.errors import UserError


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

