from .abn import (ABN, ABN_CHOICES, PureABN, inplace_abn_available, pure_abn_for,
                  use_pure_abn)
from .tresnet_v2 import Bottleneck, TResNetV2, TResnetL_V2
from .weights import (PUBLISHED_WEIGHTS, WeightsError, extract_state_dict, load_tresnet_weights,
                      read_checkpoint, resolve_weights)

__all__ = ["ABN", "ABN_CHOICES", "PureABN", "inplace_abn_available", "pure_abn_for",
           "use_pure_abn", "Bottleneck", "TResNetV2", "TResnetL_V2", "PUBLISHED_WEIGHTS",
           "WeightsError", "extract_state_dict", "load_tresnet_weights", "read_checkpoint",
           "resolve_weights"]
