from .abn import ABN, PureABN, inplace_abn_available, use_pure_abn
from .tresnet_v2 import Bottleneck, TResNetV2, TResnetL_V2
from .weights import (PUBLISHED_WEIGHTS, WeightsError, extract_state_dict, load_tresnet_weights,
                      read_checkpoint, resolve_weights)

__all__ = ["ABN", "PureABN", "inplace_abn_available", "use_pure_abn", "Bottleneck", "TResNetV2",
           "TResnetL_V2", "PUBLISHED_WEIGHTS", "WeightsError", "extract_state_dict",
           "load_tresnet_weights", "read_checkpoint", "resolve_weights"]
