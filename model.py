"""The reference's `model.py` names. The network lives in `cmal/model.py`; this file keeps
`from model import ...` (the reference's scripts and notebooks) working from the project folder."""
from cmal.model import CMALNet, CMALOutput, Features, Network_Wrapper, build_cmal

__all__ = ["CMALNet", "CMALOutput", "Features", "Network_Wrapper", "build_cmal"]
