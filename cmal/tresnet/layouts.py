"""Which network a weight file holds, told from its key names and shapes; and timm's names for
TResNet's entries mapped back to the published ones.

timm's TResNet (timm/models/tresnet.py) converted the published files with its
checkpoint_filter_fn: every conv-ABN unit `convN.0` / `convN.1` became `convN.conv` / `convN.bn`
(the stride-2 `conv2.0.0` / `conv2.0.1` too, the anti-alias filter becoming `conv2.aa`, which
holds no entry), `downsample.i.0` / `.1` became `downsample.i.conv` / `.bn`, and each ABN weight
w became the batch-norm scale |w| + 1e-5. from_timm_names undoes exactly that.
"""
import re

import torch

ABN_EPS = 1e-5  # InPlaceABN's eps, which timm added to every converted scale

# A conv-ABN unit in timm's names: body.conv1.conv.weight, ....conv3.bn.bias,
# ....downsample.1.conv.weight
_TIMM_UNIT = re.compile(r"\.(conv\d+|downsample\.\d+)\.(conv|bn)\.")
# The first block of layer2..layer4 has stride 2: the published code wraps its conv2 in a
# Sequential with the anti-alias filter (conv2.0.0 / conv2.0.1); timm keeps conv2.conv / conv2.bn.
_TIMM_STRIDED_CONV2 = re.compile(r"^(body\.layer[234]\.0\.conv2)\.(conv|bn)\.")

# Entries only a whole CMAL-Net has (cmal.model.CMALNet).
_CMAL_PREFIXES = ("Features.net_layer_", "conv_block1.", "classifier_concat.")
# (blocks per stage, stem width) -> name, as timm's and the publisher's factories build them.
_TRESNETS_V2 = {((3, 4, 23, 3), 64): "TResNet-L-V2"}
_TRESNETS_V1 = {((3, 4, 11, 3), 64): "TResNet-M", ((4, 5, 18, 3), 76): "TResNet-L",
                ((4, 5, 24, 3), 83): "TResNet-XL"}
_RESNETS = {("basic", (2, 2, 2, 2)): "ResNet-18", ("basic", (3, 4, 6, 3)): "ResNet-34",
            ("bottleneck", (3, 4, 6, 3)): "ResNet-50", ("bottleneck", (3, 4, 23, 3)): "ResNet-101",
            ("bottleneck", (3, 8, 36, 3)): "ResNet-152"}


def has_timm_names(state):
    """Whether a TResNet state dict names its entries as timm does (body.conv1.conv.weight)
    rather than as the published files (body.conv1.0.weight)."""
    return any(_TIMM_UNIT.search(k) for k in state if k.startswith("body."))


def published_name(key):
    """The published name of a TResNet entry named as timm names it."""
    unit = {"conv": "0", "bn": "1"}
    key = _TIMM_STRIDED_CONV2.sub(lambda m: f"{m[1]}.0.{unit[m[2]]}.", key)
    return _TIMM_UNIT.sub(lambda m: f".{m[1]}.{unit[m[2]]}.", key)


def from_timm_names(state):
    """`state` (timm's names) with the published names, and each batch-norm scale s turned back
    into the ABN weight s - 1e-5, so that ABN's |w| + 1e-5 gives s again.

    timm stored |w| + 1e-5, so the sign of the original w is lost; ABN computes with |w| and its
    gradient moves |w| alike for either sign, so the network and its training are the same. A
    scale below 1e-5, which only a network trained in timm can have, is not of that form: one in
    [0, 1e-5) becomes the weight 0 (ABN's scale 1e-5, less than 1e-5 off); a negative one cannot
    be computed by ABN at all. Returns (state, the published names of the negative scales).
    """
    out, negative = {}, []
    for key, value in state.items():
        name = published_name(key)
        if _is_timm_bn_weight(key):
            if (value < 0).any():
                negative.append(name)
            value = (value.float() - ABN_EPS).clamp_(min=0)
        out[name] = value
    return out, negative


def _is_timm_bn_weight(key):
    return key.endswith(".bn.weight") and _TIMM_UNIT.search(key) is not None


def describe(state):
    """The network a state dict (published or timm names) holds, in a few words: "TResNet-L-V2
    (blocks 3,4,23,3, stem width 64; a 11221-class head)", "ResNet-50 (...)", "a whole CMAL-Net
    (...)", or "an unrecognised network (...)"."""
    if any(k.startswith(_CMAL_PREFIXES) for k in state):
        return ("a whole CMAL-Net (Features.*, conv_block*, classifier*), as this project's "
                "training checkpoints hold it: continue its run with --resume=FILE, or score it "
                "with --test_only --resume=FILE")
    if has_timm_names(state):
        state = {published_name(k): v for k, v in state.items()}
    if "body.conv1.0.weight" in state:
        return _describe_tresnet(state)
    if "conv1.weight" in state and any(k.startswith("layer1.0.") for k in state):
        return _describe_resnet(state)
    keys = list(state)
    return f"an unrecognised network ({len(keys)} entries; the first: {', '.join(keys[:4])})"


def _blocks(state, prefix):
    """Blocks per stage of a ResNet-like state dict whose stage N is `{prefix}N.<block>.`."""
    counts = []
    for stage in range(1, 5):
        pattern = re.compile(rf"^{re.escape(prefix)}{stage}\.(\d+)\.")
        found = {int(m[1]) for k in state if (m := pattern.match(k))}
        counts.append(max(found) + 1 if found else 0)
    return tuple(counts)


def _head(state, key):
    weight = state.get(key)
    return f"; a {weight.shape[0]}-class head" if isinstance(weight, torch.Tensor) and \
        weight.dim() == 2 else ""


def _describe_tresnet(state):
    blocks = _blocks(state, "body.layer")
    width = state["body.conv1.0.weight"].shape[0]
    # V2 has bottleneck blocks (a conv3) in every stage; V1 basic blocks in the first two.
    v2 = all(f"body.layer{s}.0.conv3.0.weight" in state for s in range(1, 5))
    name = (_TRESNETS_V2 if v2 else _TRESNETS_V1).get((blocks, width)) or \
        f"a TResNet-{'V2' if v2 else 'V1'} variant"
    return (f"{name} (blocks {','.join(map(str, blocks))}, stem width {width}"
            f"{_head(state, 'head.fc.weight')})")


def _describe_resnet(state):
    blocks = _blocks(state, "layer")
    kind = "bottleneck" if "layer1.0.conv3.weight" in state else "basic"
    name = _RESNETS.get((kind, blocks)) or f"a ResNet-like network with {kind} blocks"
    return (f"{name} (blocks {','.join(map(str, blocks))}, torchvision's / timm's ResNet names"
            f"{_head(state, 'fc.weight')})")
