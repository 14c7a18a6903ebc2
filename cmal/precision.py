"""--amp on a device, decided once: autocast's dtype, the gradient scaler and the ABN kind they
imply. A run builds one from its settings; --test_only and a resumed run from the checkpoint's
settings (the network and its evaluation then agree). The engine's functions take it as one
argument (`precision`; None: float32)."""
import contextlib
import functools

import torch

from cmal.tresnet.abn import abn_kind_for

DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    def __init__(self, amp, device):
        if amp not in DTYPES:
            raise ValueError(f"--amp must be one of {', '.join(DTYPES)}, got {amp!r}")
        self.amp, self.device = amp, torch.device(device)
        self.dtype = DTYPES[amp]  # autocast's, None for float32

    @classmethod
    def of_dtype(cls, dtype, device):
        """The Precision whose autocast dtype is `dtype` (None: float32)."""
        return cls(next(k for k, v in DTYPES.items() if v == dtype), device)

    def autocast(self, cache=True):
        """The forward's context; cache=False inside a CUDA graph capture (autocast's cache of
        cast weights would be freed memory at replay)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, cache_enabled=cache)

    def new_scaler(self):
        """fp16's gradient scaler (its state goes into checkpoints), or None."""
        return torch.amp.GradScaler(self.device.type) if self.amp == "fp16" else None

    @functools.cached_property
    def scaler(self):
        """The run's gradient scaler (new_scaler), made when first asked for: the one every
        optimizer step of this precision uses, and whose state checkpoints keep."""
        return self.new_scaler()

    def scaler_state(self):
        """What a checkpoint keeps of the scaler (its "scaler" entry): its state, or None."""
        return self.scaler.state_dict() if self.scaler else None

    def load_scaler_state(self, state):
        """The scaler's state from a checkpoint's "scaler" entry (nothing to load: nothing done)."""
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)

    def abn_kind(self, choice, cuda_graph=False):
        """The ABN an --abn setting builds at this precision (tresnet.abn.abn_kind_for)."""
        return abn_kind_for(choice, self.device, amp=self.dtype is not None,
                            cuda_graph=cuda_graph)
