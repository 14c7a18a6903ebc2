"""CMAL-Net: three experts on layer2, layer3 and layer4 of TResNet-L-V2, and their concatenation."""
import functools
from typing import NamedTuple

import torch
import torch.nn as nn

from cmal import engine
from cmal.basic_conv import BasicConv
from cmal.cuda_graph import GraphedIteration
from cmal.scores import combined_scores
from cmal.tresnet.tresnet_v2 import TResnetL_V2
from cmal.tresnet.weights import RANDOM_INIT, load_backbone


class Features(nn.Module):
    """The backbone body split at the three depths the experts read."""

    def __init__(self, net_layers):
        super().__init__()
        self.net_layer_0 = nn.Sequential(net_layers[0])
        self.net_layer_1 = nn.Sequential(*net_layers[1])
        self.net_layer_2 = nn.Sequential(*net_layers[2])
        self.net_layer_3 = nn.Sequential(*net_layers[3])
        self.net_layer_4 = nn.Sequential(*net_layers[4])
        self.net_layer_5 = nn.Sequential(*net_layers[5])

    def forward(self, x):
        x = self.net_layer_2(self.net_layer_1(self.net_layer_0(x)))
        x1 = self.net_layer_3(x)
        x2 = self.net_layer_4(x1)
        x3 = self.net_layer_5(x2)
        return x1, x2, x3


def _classifier(in_features, hidden, num_classes):
    return nn.Sequential(
        nn.BatchNorm1d(in_features),
        nn.Linear(in_features, hidden),
        nn.BatchNorm1d(hidden),
        nn.ELU(inplace=True),
        nn.Linear(hidden, num_classes),
    )


class CMALNet(nn.Module):
    """The reference `Network_Wrapper`.

    forward returns a CMALOutput: (logits1, logits2, logits3, logits_concat, map1, map2, map3). Each
    expert pools its conv block output with a global max; the reference's MaxPool2d(46 / 23 / 12)
    is exactly that at 368 px, and the global form accepts any input size.
    """

    method = "cmal"  # its entry in methods.REGISTRY

    def __init__(self, net_layers, num_classes, in_channels=(512, 1024, 2048), mid_channels=512,
                 feature_channels=1024, hidden=512):
        super().__init__()
        self.Features = Features(net_layers)
        for i, c in enumerate(in_channels, start=1):
            setattr(self, f"conv_block{i}", nn.Sequential(
                BasicConv(c, mid_channels, kernel_size=1, stride=1, padding=0, relu=True),
                BasicConv(mid_channels, feature_channels, kernel_size=3, stride=1, padding=1,
                          relu=True)))
            setattr(self, f"classifier{i}", _classifier(feature_channels, hidden, num_classes))
        self.classifier_concat = _classifier(feature_channels * 3, hidden, num_classes)

    def experts(self):
        """(conv_block, classifier) of experts 1, 2, 3."""
        return [(self.conv_block1, self.classifier1), (self.conv_block2, self.classifier2),
                (self.conv_block3, self.classifier3)]

    def optimizer_modules(self):
        """The reference SGD's eight groups, in its order (the backbone last)."""
        return [self.classifier_concat, self.conv_block1, self.classifier1, self.conv_block2,
                self.classifier2, self.conv_block3, self.classifier3, self.Features]

    @torch.no_grad()
    def evaluation_logits(self, inputs, with_maps=False):
        """(concat, com2, combined, experts' logits) of a batch, as evaluation scores it; with
        `with_maps`, the experts' attention maps too."""
        s = combined_scores(self, inputs)
        return (s.heads[3], s.com2, s.com, tuple(s.heads[:3])) + ((s.maps,) if with_maps else ())

    def forward(self, x):
        feats = self.Features(x)
        logits, maps, pooled = [], [], []
        for x_i, (conv_block, classifier) in zip(feats, self.experts()):
            f = conv_block(x_i)
            maps.append(f.detach())
            # The reference's global max pool. amax has a deterministic CUDA backward; it differs
            # from max pooling's only on exact ties, which after the ReLU occur at 0, where the
            # ReLU passes no gradient anyway.
            v = f.amax((2, 3))
            pooled.append(v)
            logits.append(classifier(v))
        logits_concat = self.classifier_concat(torch.cat(pooled, -1))
        return CMALOutput(*logits, logits_concat, *maps)


class CMALOutput(NamedTuple):
    """What CMALNet.forward returns; a tuple in the reference's order, so its positional
    unpacking still works."""
    logits1: torch.Tensor
    logits2: torch.Tensor
    logits3: torch.Tensor
    logits_concat: torch.Tensor
    map1: torch.Tensor  # the experts' conv block outputs (detached): their attention features
    map2: torch.Tensor
    map3: torch.Tensor

    @property
    def heads(self):
        """The four classifiers' logits: experts 1, 2, 3 and the concatenation."""
        return self[:4]

    @property
    def expert_logits(self):
        return self[:3]

    @property
    def maps(self):
        return self[4:]


Network_Wrapper = CMALNet  # the reference's name


def build_cmal(num_classes, weights=None, mid_channels=512, feature_channels=1024, hidden=512,
               **backbone_options):
    """CMAL-Net on TResNet-L-V2 (or a smaller TResNet-V2 via `layers` / `width_factor`).

    `weights`: TResNet-L-V2 weights for the backbone (a name of weights.WEIGHT_NAMES, a URL or a
    file); their classifier head is not used by CMAL-Net. The network's `init_record` says what
    initialised it (weights.load_backbone's record, or RANDOM_INIT), as timm's models keep their
    pretrained_cfg.
    """
    backbone = TResnetL_V2({"num_classes": num_classes, **backbone_options})
    record = load_backbone(backbone, weights, load_head=False) if weights else dict(RANDOM_INIT)
    net = CMALNet(list(backbone.body.children()), num_classes, backbone.stage_channels,
                  mid_channels=mid_channels, feature_channels=feature_channels, hidden=hidden)
    net.init_record = record
    return net


def build(cfg, abn, weights=None):
    """CMAL-Net as a run's settings describe it, with this ABN kind (methods.Method.build)."""
    return build_cmal(cfg.num_classes, weights=weights, mid_channels=cfg.head_mid,
                      feature_channels=cfg.head_features, hidden=cfg.head_hidden,
                      layers=cfg.layers, width_factor=cfg.width_factor, abn=abn)


def iteration(cfg, cuda_graph=False):
    """What one training batch runs: the reference's five steps (or an ablation of them), with
    `cuda_graph` replayed as one CUDA graph."""
    if cuda_graph:
        return GraphedIteration(cfg.ablation)
    if cfg.ablation == "none":
        return engine.train_step
    return functools.partial(engine.train_step, ablation=cfg.ablation)


def compile_network(net):
    """torch.compile for fixed input sizes: a new size recompiles instead of switching to
    symbolic shapes (which this network's space-to-depth trips inductor with)."""
    return torch.compile(net, dynamic=False)
