"""What the steps of a conversion pass along: the record of one image to write (Item, whose
source is a file or a Blob of bytes) and the error that says what a source or destination lacks.
"""
from collections import namedtuple
from pathlib import Path

from cmal.errors import UserError


class PrepareError(UserError):
    """A source or destination the converter cannot use; the message says what it expected."""


class Item(namedtuple("Item", "source split label name box", defaults=(None,))):
    """One image to write: source (a Path, or a Blob of bytes) -> OUT/split/label/name, with its
    box (x0, y0, x1, y1 in the source image, as in boxes.csv) or None."""

    @property
    def dest(self):
        return Path(self.split, self.label, self.name)


class Blob(namedtuple("Blob", "data origin")):
    """An image held in memory (from a parquet export); `origin` says where it was read."""

    def __str__(self):
        return self.origin


def some(values, limit=5):
    """`values` listed for a message: the first `limit` of them, and how many there are."""
    values = [str(v) for v in values]
    more = f" ... ({len(values)} in all)" if len(values) > limit else ""
    return ", ".join(values[:limit]) + more
