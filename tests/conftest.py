import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures"
# A TResNet-V2 small enough for fast tests: one block per stage, a quarter of the width.
SMALL = {"layers": (1, 1, 1, 1), "width_factor": 0.25}


def load_fixture(name):
    return json.loads((FIXTURES / name).read_text())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["inplace", "pure"])
def abn_impl(request):
    """Run a test once per ABN implementation; the compiled one only where it is installed."""
    from src.models import inplace_abn_available
    if request.param == "inplace" and not inplace_abn_available():
        pytest.skip("inplace_abn is not installed (make setup builds it)")
    return request.param == "pure"
