import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
# A TResNet-V2 small enough for fast tests: one block per stage, a quarter of the width.
SMALL = {"layers": (1, 1, 1, 1), "width_factor": 0.25}


def load_fixture(name):
    return json.loads((FIXTURES / name).read_text())


# Tiny networks gain nothing from several threads, and oversubscribed threads slow every
# process on a shared machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["inplace", "pure", "native"])
def abn_impl(request):
    """Run a test once per ABN kind; the compiled one only where it is installed."""
    from cmal.tresnet import inplace_abn_available
    if request.param == "inplace" and not inplace_abn_available():
        pytest.skip("inplace_abn is not installed (make setup builds it)")
    return request.param


# The smallest CMAL-Net the training tests use, with its command-line settings.
TINY_NET = {"layers": (1, 1, 1, 1), "width_factor": 0.125, "mid_channels": 16,
            "feature_channels": 32, "hidden": 16}
TINY_ARGS = ["--layers=1,1,1,1", "--width_factor=0.125", "--head_mid=16", "--head_features=32",
             "--head_hidden=16", "--image_size=32", "--resize=36", "--crop_padding=2",
             "--batch_size=4", "--test_batch_size=3", "--workers=0", "--progress=false",
             "--lr=0.01", "--backbone_lr=0.01", "--device=cpu"]


def make_image_folder(root, classes=3, train=8, test=3, size=40, seed=0):
    """A dataset in the train/test class-folder layout: noisy images tinted by class."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("test", test)):
        for c in range(classes):
            folder = Path(root) / split / f"class_{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                a = rng.integers(0, 120, (size, size, 3))
                a[..., c % 3] += 120
                Image.fromarray(a.astype("uint8")).save(folder / f"{i}.jpg", quality=90)
    return Path(root)


@pytest.fixture
def image_folder(tmp_path):
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run trained for two epochs on a 3-class image folder (beside it, in data/), shared
    by the tests of one module: its output folder."""
    from cmal import train
    root = tmp_path_factory.mktemp("tiny_run")
    data = make_image_folder(root / "data")
    out = root / "run"
    torch.manual_seed(0)
    assert train.main({"data_path": str(data), "num_classes": 3, "output_dir": str(out)},
                      TINY_ARGS + ["--epochs=2", "--eval_every=1"]) == 0
    return out
