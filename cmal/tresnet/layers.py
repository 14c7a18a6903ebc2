"""The parameter-free and small building blocks of TResNet."""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .abn import ABN

MIN_INPUT_SIDE = 32


class SpaceToDepth(nn.Module):
    """(N, C, H, W) -> (N, 16C, H/4, W/4); output channel (row * 4 + col) * C + c."""

    def __init__(self, block_size=4):
        super().__init__()
        self.bs = block_size

    def forward(self, x):
        n, c, h, w = x.shape
        bs = self.bs
        if h % bs or w % bs or h < MIN_INPUT_SIDE or w < MIN_INPUT_SIDE:
            raise ValueError(f"TResNet got an input of {h}x{w} pixels; each side must be a multiple "
                             f"of {bs} and at least {MIN_INPUT_SIDE} (use e.g. 368, 224 or any "
                             "multiple of 32)")
        x = x.reshape(n, c, h // bs, bs, w // bs, bs)
        x = x.permute(0, 3, 5, 1, 2, 4).contiguous()
        return x.view(n, c * bs * bs, h // bs, w // bs)


class AntiAliasDownsample(nn.Module):
    """Blur-then-subsample: depthwise [1, 2, 1] x [1, 2, 1] / 16 filter, reflect padding, stride 2.

    The filter is a non-persistent buffer: it follows .to(device) and dtype changes but is not
    part of the state dict, as in the published weight files.
    """

    def __init__(self, channels, stride=2):
        super().__init__()
        self.channels = channels
        self.stride = stride
        a = torch.tensor([1.0, 2.0, 1.0])
        filt = (a[:, None] * a[None, :]) / 16.0
        self.register_buffer("filt", filt[None, None].repeat(channels, 1, 1, 1), persistent=False)

    def forward(self, x):
        return F.conv2d(_reflect_pad_1(x), self.filt.to(x.dtype), stride=self.stride,
                        groups=self.channels)

    def extra_repr(self):
        return f"channels={self.channels}, stride={self.stride}"


def _reflect_pad_1(x):
    """F.pad(x, (1, 1, 1, 1), mode="reflect") from slices: the same values, but with a
    deterministic CUDA backward (reflection padding's uses atomics) and no float32 round trip
    under CPU autocast (which runs reflection padding in float32)."""
    x = torch.cat([x[:, :, 1:2], x, x[:, :, -2:-1]], 2)
    return torch.cat([x[:, :, :, 1:2], x, x[:, :, :, -2:-1]], 3)


class SEModule(nn.Module):
    """Squeeze-and-excitation: channel gates from the global average, through a 1x1 bottleneck."""

    def __init__(self, channels, reduction_channels):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, reduction_channels, kernel_size=1, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(reduction_channels, channels, kernel_size=1, bias=True)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        s = self.fc2(self.relu(self.fc1(s)))
        return x * torch.sigmoid(s)


class GlobalAvgPool(nn.Module):
    """Mean over H and W, flattened to (N, C)."""

    def forward(self, x):
        return x.mean((2, 3))


def conv2d_abn(in_channels, out_channels, kernel_size, stride=1, activation="leaky_relu",
               activation_param=1e-6, abn=None):
    """The conv-ABN unit: keys `.0.weight` (conv, no bias) and `.1.*` (ABN)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                  bias=False),
        ABN(out_channels, activation=activation, activation_param=activation_param, kind=abn),
    )
