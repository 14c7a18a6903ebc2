"""The reference's `src.models` import path for the TResNet-L-V2 backbone. The code lives in
`cmal/tresnet/` (importable from any folder once `pip install -e .` has run); this package keeps
`from src.models import TResnetL_V2` working from the project folder."""
from cmal.tresnet import (PUBLISHED_WEIGHTS, TResNetV2, TResnetL_V2, WeightsError,
                          load_tresnet_weights)

__all__ = ["PUBLISHED_WEIGHTS", "TResNetV2", "TResnetL_V2", "WeightsError", "load_tresnet_weights"]
