"""CMAL-Net (Cross-layer Mutual Attention Learning) on a TResNet-L-V2 backbone.

The library behind the top-level scripts: `cmal.model` (the network), `cmal.engine` (one
iteration, one epoch, one evaluation), `cmal.train` (a whole run), `cmal.test_only`
(--test_only), `cmal.settings`, `cmal.precision`, `cmal.checkpoint` (with `cmal.files` and
`cmal.run_logs`), `cmal.data` (with `cmal.folders` and `cmal.images`), `cmal.datasets` (datasets
as distributed converted into the training's layout, and its boxes.csv), `cmal.tresnet` (the
backbone) and `cmal.tools` (the side tools, each run as `python -m cmal.tools.NAME`). docs/layout.md
says what each module holds.
"""
__version__ = "1.3.0"
