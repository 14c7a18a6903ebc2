"""The reference's `basic_conv.py`. The code lives in `cmal/basic_conv.py`."""
from cmal.basic_conv import BasicConv

__all__ = ["BasicConv"]
