from .abn import (ABN, ABN_CHOICES, ABN_KINDS, NativeABN, PureABN, abn_kind, abn_kind_for,
                  inplace_abn_available)
from .tresnet_v2 import Bottleneck, TResNetV2, TResnetL_V2
from .weights import (PUBLISHED_WEIGHTS, WeightsError, extract_state_dict, load_tresnet_weights,
                      read_checkpoint, resolve_weights)

__all__ = ["ABN", "ABN_CHOICES", "ABN_KINDS", "NativeABN", "PureABN", "abn_kind", "abn_kind_for",
           "inplace_abn_available", "Bottleneck", "TResNetV2", "TResnetL_V2", "PUBLISHED_WEIGHTS",
           "WeightsError", "extract_state_dict", "load_tresnet_weights", "read_checkpoint",
           "resolve_weights"]
