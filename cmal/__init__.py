"""CMAL-Net (Cross-layer Mutual Attention Learning) on a TResNet-L-V2 backbone.

The library behind the top-level scripts: `cmal.model` (the network), `cmal.engine` (one
iteration, one epoch, one evaluation), `cmal.train` (a whole run), `cmal.settings`,
`cmal.checkpoint`, `cmal.data`, `cmal.datasets` (datasets as distributed converted into the
training's layout, and its boxes.csv), `cmal.tresnet` (the backbone) and `cmal.tools` (the side
tools, each run as `python -m cmal.tools.NAME`).
"""
__version__ = "1.3.0"
