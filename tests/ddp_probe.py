"""train.main under torchrun, also saving each rank's final state dict as rank<N>.pt in the
output folder (tests compare them)."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cmal import methods  # noqa: E402
from cmal import settings  # noqa: E402
from cmal import train  # noqa: E402

models = []
original = methods.Method.build


def build(*args, **kwargs):
    models.append(original(*args, **kwargs))
    return models[-1]


methods.Method.build = build
status = train.main(None, sys.argv[1:])
cfg = settings.parse(None, sys.argv[1:])
torch.save(models[-1].state_dict(), Path(cfg.output_dir) / f"rank{os.environ['RANK']}.pt")
sys.exit(status)
