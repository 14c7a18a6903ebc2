"""The reference's `utils.py` names (attention crops and the cosine schedule). The code lives in
`cmal/utils.py`; this file keeps `from utils import ...` working from the project folder."""
from cmal.utils import attention_im, cosine_anneal_schedule, highlight_im, map_generate

__all__ = ["attention_im", "cosine_anneal_schedule", "highlight_im", "map_generate"]
