"""What CMAL-Net's evaluation computes for a batch (spec section 5): each expert's attention map,
the joint attention crop, and the logits of the raw and the crop pass, summed into the scores."""
from collections import namedtuple

import torch

from cmal.distributed import unwrap
from cmal.utils import highlight_im, map_generate


def attention_maps(net, outputs):
    """a1, a2, a3: each expert's class activation map, from a forward's logits and maps."""
    net = unwrap(net)
    return [map_generate(features.detach(), logits.detach(), classifier[1].weight.detach(),
                         classifier[4].weight.detach())
            for features, logits, (_, classifier) in zip(outputs.maps, outputs.expert_logits,
                                                         net.experts())]


# heads: (logits_1, logits_2, logits_3, logits_concat) of the raw pass; maps: the experts'
# class activation maps (a1, a2, a3); crop: the joint attention crop; heads_att: the four logits
# of the pass on it; com2 = sum(heads); com = com2 + sum(heads_att), the "combined" score.
Scores = namedtuple("Scores", "heads maps crop heads_att com2 com")


@torch.no_grad()
def combined_scores(model, inputs):
    """Every score evaluation computes for a batch (spec section 5), in float32.

    `model` is the plain module in eval mode; then every sample's scores are independent of
    the rest of the batch."""
    out = model(inputs)
    maps = attention_maps(model, out)
    crop = highlight_im(inputs, *maps)
    out_att = model(crop)
    heads = [o.float() for o in out.heads]
    heads_att = [o.float() for o in out_att.heads]
    com2 = sum(heads)
    return Scores(heads, maps, crop, heads_att, com2, com2 + sum(heads_att))
