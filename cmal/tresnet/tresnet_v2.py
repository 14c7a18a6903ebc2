"""TResNet-V2 (Ridnik et al., "TResNet: High Performance GPU-Dedicated Architecture", 2021).

Module names, order and shapes follow the published TResNet-L-V2 weight files, so their state
dicts load with strict=True. Unlike the published code, nothing here touches CUDA at
construction: the anti-alias filter is a buffer that follows the module's device.
"""
from collections import OrderedDict

import torch
import torch.nn as nn

from .abn import is_abn
from .layers import AntiAliasDownsample, GlobalAvgPool, SEModule, SpaceToDepth, conv2d_abn

LEAKY = 1e-6  # the V2 network's negative slope for every leaky unit


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, use_se=True, abn=None):
        super().__init__()
        self.conv1 = conv2d_abn(inplanes, planes, 1, activation_param=LEAKY, abn=abn)
        if stride == 1:
            self.conv2 = conv2d_abn(planes, planes, 3, activation_param=LEAKY, abn=abn)
        else:
            self.conv2 = nn.Sequential(
                conv2d_abn(planes, planes, 3, activation_param=LEAKY, abn=abn),
                AntiAliasDownsample(planes, stride=stride),
            )
        self.conv3 = conv2d_abn(planes, planes * self.expansion, 1, activation="identity",
                                abn=abn)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.se = SEModule(planes, max(planes * self.expansion // 8, 64)) if use_se else None

    def forward(self, x):
        residual = self.downsample(x) if self.downsample is not None else x
        out = self.conv2(self.conv1(x))
        if self.se is not None:
            out = self.se(out)
        out = self.conv3(out)
        return self.relu(out + residual)


class TResNetV2(nn.Module):
    """TResNet-V2 with Bottleneck blocks in every stage.

    `layers` (blocks per stage) and `width_factor` are parameters so that small variants can be
    built for tests and demos; (3, 4, 23, 3) and 1.0 give TResNet-L-V2.
    """

    def __init__(self, layers=(3, 4, 23, 3), in_chans=3, num_classes=1000, width_factor=1.0,
                 abn=None):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"TResNet needs four stages of at least one block, got layers={layers}")
        self.abn = abn
        self.planes = int(64 * width_factor)
        if self.planes < 1:
            raise ValueError(f"width_factor={width_factor} leaves no channels")
        self.inplanes = self.planes
        conv1 = conv2d_abn(in_chans * 16, self.planes, 3, activation_param=LEAKY, abn=abn)
        layer1 = self._make_layer(self.planes, layers[0], stride=1, use_se=True)
        layer2 = self._make_layer(self.planes * 2, layers[1], stride=2, use_se=True)
        layer3 = self._make_layer(self.planes * 4, layers[2], stride=2, use_se=True)
        layer4 = self._make_layer(self.planes * 8, layers[3], stride=2, use_se=False)
        self.body = nn.Sequential(OrderedDict([
            ("SpaceToDepth", SpaceToDepth()),
            ("conv1", conv1),
            ("layer1", layer1),
            ("layer2", layer2),
            ("layer3", layer3),
            ("layer4", layer4),
        ]))
        # Output widths of layer2..layer4: the CMAL heads read them.
        self.stage_channels = [self.planes * k * Bottleneck.expansion for k in (2, 4, 8)]
        self.num_features = self.stage_channels[-1]
        self.global_pool = nn.Sequential(OrderedDict([("global_pool_layer", GlobalAvgPool())]))
        self.head = nn.Sequential(OrderedDict([("fc", nn.Linear(self.num_features, num_classes))]))
        self._init_weights()

    def _make_layer(self, planes, blocks, stride, use_se):
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            layers = []
            if stride == 2:
                # Average-pool before the 1x1 conv instead of a strided 1x1 conv.
                layers.append(nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True,
                                           count_include_pad=False))
            layers.append(conv2d_abn(self.inplanes, planes * Bottleneck.expansion, 1,
                                     activation="identity", abn=self.abn))
            downsample = nn.Sequential(*layers)
        blocks_ = [Bottleneck(self.inplanes, planes, stride, downsample, use_se, self.abn)]
        self.inplanes = planes * Bottleneck.expansion
        blocks_ += [Bottleneck(self.inplanes, planes, 1, None, use_se, self.abn)
                    for _ in range(1, blocks)]
        return nn.Sequential(*blocks_)

    @torch.no_grad()
    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.BatchNorm2d) or is_abn(m):
                m.weight.fill_(1)
                m.bias.zero_()
        for m in self.modules():
            if isinstance(m, Bottleneck):
                # Each residual branch starts as (almost) the identity.
                m.conv3[1].weight.zero_()
            elif isinstance(m, nn.Linear):
                m.weight.normal_(0, 0.01)

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.global_pool(self.body(x)))


def TResnetL_V2(model_params):
    """TResNet-L-V2 from a parameter dict, as the published code calls it.

    Keys: `num_classes` (required); optional `layers` (default (3, 4, 23, 3)), `width_factor`
    (1.0), `in_chans` (3) and `abn` (an ABN kind: 'inplace', 'pure' or 'native'; None:
    InPlaceABN when importable).
    """
    known = {"num_classes", "layers", "width_factor", "in_chans", "abn"}
    unknown = set(model_params) - known
    if unknown:
        raise ValueError(f"TResnetL_V2: unknown model_params {sorted(unknown)}; known: {sorted(known)}")
    if "num_classes" not in model_params:
        raise ValueError("TResnetL_V2: model_params needs 'num_classes'")
    return TResNetV2(layers=tuple(model_params.get("layers", (3, 4, 23, 3))),
                     in_chans=model_params.get("in_chans", 3),
                     num_classes=model_params["num_classes"],
                     width_factor=model_params.get("width_factor", 1.0),
                     abn=model_params.get("abn"))
