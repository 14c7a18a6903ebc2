"""Activated batch normalisation (ABN): batch norm with an |weight| + eps scale, then an activation.

TResNet is built on `inplace_abn.InPlaceABN`, a compiled extension. `PureABN` and `NativeABN`
compute the same function with ordinary PyTorch operations and the same parameter and buffer
names, so weight files load into any of the three. Which one a network gets is its `abn` kind
(ABN_KINDS, chosen by --abn through abn_kind_for); without one, InPlaceABN where it is
importable.
"""
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    from inplace_abn import InPlaceABN
except ImportError as exc:  # the extension is missing or was built against another torch
    InPlaceABN = None
    _IMPORT_ERROR = exc
else:
    _IMPORT_ERROR = None

    class _InPlaceABN(InPlaceABN):
        """InPlaceABN fed what the extension accepts: contiguous tensors, and under autocast
        float16 on CUDA (its kernels take it with float32 weights) or float32 otherwise."""

        def forward(self, x):
            if x.dtype != self.weight.dtype and not (x.is_cuda and x.dtype == torch.float16):
                x = x.float()
            return super().forward(x.contiguous())

_ACTIVATIONS = ("leaky_relu", "identity")


def _abn_affine(x, weight, bias, mean, var, eps, slope):
    """(y, inv_std, scale): x (N, C, S) normalised with `mean` and `var`, scaled by |weight| + eps,
    shifted by `bias`, then the leaky activation (`slope`) or none (slope None)."""
    abs_weight = torch.where(weight < 0, -weight, weight) + eps
    inv_std = 1 / torch.sqrt(var + eps)
    scale = abs_weight * inv_std
    y = x * scale[:, None] + (bias - mean * abs_weight * inv_std)[:, None]
    if slope is not None:
        y = F.leaky_relu(y, slope, inplace=True)
    return y, inv_std, scale


class _ABNFunction(torch.autograd.Function):
    """Batch norm with an |weight| + eps scale and a leaky or identity activation, on (N, C, S).

    The forward follows inplace_abn's CPU kernel step by step (two-pass statistics, then
    x * scale + shift), so that both round alike: deep networks amplify rounding differences,
    and the reference outputs were computed with that kernel. The backward is InPlaceABN's
    closed form, a few passes over the activations instead of autograd's dozen.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, slope):
        if training:
            mean = x.mean((0, 2))
            var = (x - mean[:, None]).pow(2).mean((0, 2))
            count = x.shape[0] * x.shape[2]
            running_mean.mul_(1 - momentum).add_(momentum * mean)
            running_var.mul_(1 - momentum).add_(momentum * var * count / (count - 1))
        else:
            mean, var = running_mean, running_var
        y, inv_std, scale = _abn_affine(x, weight, bias, mean, var, eps, slope)
        ctx.save_for_backward(x, y, weight, mean, inv_std, scale)
        ctx.training, ctx.slope = training, slope
        return y

    @staticmethod
    def backward(ctx, dy):
        x, y, weight, mean, inv_std, scale = ctx.saved_tensors
        if ctx.slope is not None:
            dy = torch.where(y >= 0, dy, dy * ctx.slope)
        xhat = (x - mean[:, None]) * inv_std[:, None]
        sum_dy = dy.sum((0, 2))
        sum_xhat_dy = (xhat * dy).sum((0, 2))
        if ctx.training:  # the batch statistics depend on x too
            n = x.shape[0] * x.shape[2]
            dx = (dy - (sum_dy / n)[:, None] - xhat * (sum_xhat_dy / n)[:, None]) * scale[:, None]
        else:
            dx = dy * scale[:, None]
        # d|w|/dw taken as +1 at w == 0, as InPlaceABN does: the zero-initialised scales of
        # TResNet's residual branches must be able to grow.
        dweight = torch.where(weight < 0, -sum_xhat_dy, sum_xhat_dy)
        return dx, dweight, sum_dy, None, None, None, None, None, None


class PureABN(nn.Module):
    """y = act((x - mean) / sqrt(var + eps) * (|weight| + eps) + bias), as InPlaceABN computes it.

    Running statistics follow InPlaceABN: momentum 0.1, unbiased batch variance, and
    num_batches_tracked counts training forwards.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, activation="leaky_relu",
                 activation_param=0.01):
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"ABN activation must be one of {_ACTIVATIONS}, got {activation!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.activation = activation
        self.activation_param = activation_param
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x):
        if x.dtype != self.weight.dtype:  # autocast: normalise in float32
            x = x.float()
        flat = x.reshape(x.shape[0], x.shape[1], -1)
        if self.training:
            if flat.shape[0] * flat.shape[2] <= 1:
                raise ValueError("ABN needs more than one value per channel to compute batch "
                                 f"statistics, got input of shape {tuple(x.shape)}")
            self.num_batches_tracked.add_(1)
        slope = self.activation_param if self.activation == "leaky_relu" else None
        if torch.jit.is_tracing() and not self.training:
            # TorchScript cannot record a Python autograd.Function: the same arithmetic, inline
            # (cmal.export traces the network in eval mode).
            y = _abn_affine(flat, self.weight, self.bias, self.running_mean, self.running_var,
                            self.eps, slope)[0]
            return y.view_as(x)
        y = _ABNFunction.apply(flat, self.weight, self.bias, self.running_mean, self.running_var,
                               self.training, self.momentum, self.eps, slope)
        return y.view_as(x)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
                f"activation={self.activation}[{self.activation_param}]")


class NativeABN(PureABN):
    """The same function as PureABN through PyTorch's own batch norm (cuDNN on CUDA).

    It computes in the input's dtype (bfloat16 or float16 under autocast) with float32
    statistics and parameters, so no activation is converted around it, and it is plain
    operations that torch.compile fuses with the neighbouring convolution. It saves its input
    and output for the backward, as PureABN does; InPlaceABN keeps only the output.
    """

    def forward(self, x):
        if self.training:
            if x.numel() // x.shape[1] <= 1:
                raise ValueError("ABN needs more than one value per channel to compute batch "
                                 f"statistics, got input of shape {tuple(x.shape)}")
            self.num_batches_tracked.add_(1)
        # where(), not abs(): its gradient is +1 at 0, as InPlaceABN's, so that TResNet's
        # zero-initialised residual scales can grow.
        scale = torch.where(self.weight < 0, -self.weight, self.weight) + self.eps
        y = F.batch_norm(x, self.running_mean, self.running_var, scale, self.bias, self.training,
                         self.momentum, self.eps)
        if self.activation == "leaky_relu":
            y = F.leaky_relu(y, self.activation_param, inplace=True)
        return y


def holds_inplace_abn(net):
    """Whether a network has an inplace_abn layer (which a CUDA graph cannot capture)."""
    return InPlaceABN is not None and any(isinstance(m, InPlaceABN) for m in net.modules())


def inplace_abn_available():
    return InPlaceABN is not None


# inplace: inplace_abn's kernels (least memory); pure: PyTorch operations with InPlaceABN's
# rounding and closed-form backward (the fastest on the CPU); native: PyTorch's batch norm in
# the autocast dtype (the fast path on CUDA with --amp, and the one torch.compile fuses).
ABN_KINDS = ("inplace", "pure", "native")
ABN_CHOICES = ("auto",) + ABN_KINDS


def abn_kind_for(choice, device, amp=False, cuda_graph=False):
    """The ABN kind an --abn setting builds on a device.

    auto: on the CPU the pure ABN (inplace_abn's CPU backward is a single-threaded loop); on
    CUDA the native one under mixed precision (InPlaceABN computes in float32, converting every
    activation up and back; under bf16 it took 48 % of the GPU time in the team's H100 profile)
    or with CUDA graphs (InPlaceABN cannot be captured in one: seen on an H200), and InPlaceABN
    in eager float32, where it saves memory.
    """
    if choice not in ABN_CHOICES:
        raise ValueError(f"--abn must be one of {', '.join(ABN_CHOICES)}, got {choice!r}")
    if choice == "inplace" and InPlaceABN is None:
        raise ValueError(f"--abn=inplace but inplace_abn is not importable ({_IMPORT_ERROR}); "
                         "run `make setup`, or use --abn=auto")
    device = torch.device(device)
    if choice == "inplace" and device.type == "cuda":
        problem = inplace_abn_gpu_problem(device)
        if problem:
            raise ValueError(f"--abn=inplace: {problem}. Rebuild it for this GPU ({REBUILD}), or "
                             "use --abn=native (the same function in PyTorch operations)")
    if choice != "auto":
        return choice
    if device.type == "cpu":
        return "pure"
    if amp or cuda_graph:
        return "native"
    kind = default_abn_kind()
    if kind == "inplace" and device.type == "cuda":
        problem = inplace_abn_gpu_problem(device)
        if problem:
            _say_once(f"{problem}; using the native ABN instead (the same function, more memory). "
                      f"To use inplace-abn on this GPU, rebuild it here: {REBUILD}")
            return "native"
    return kind


# What rebuilds the extension for the visible GPUs (the build script reads their architectures).
REBUILD = ".venv/bin/pip uninstall -y inplace-abn && bash tools/build_inplace_abn.sh .venv/bin/python"
_gpu_problems = {}


def inplace_abn_gpu_problem(device):
    """None when inplace_abn's CUDA kernels run on `device`, else what is wrong, in words.

    A wheel built for other GPU architectures imports fine and fails only at its first kernel
    launch ("no kernel image is available"), deep in a forward pass; one forward and backward on
    a tiny tensor at start finds that out. The answer is kept per device."""
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _gpu_problems:
        _gpu_problems[index] = _probe_inplace_abn(torch.device("cuda", index))
    return _gpu_problems[index]


def _probe_inplace_abn(device):
    layer = _InPlaceABN(4).to(device)
    x = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    try:
        # leaky_relu's backward inverts the activation in place, hence a clone to differentiate.
        layer(x.clone()).sum().backward()
        torch.cuda.synchronize(device)
    except RuntimeError as exc:
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return (f"inplace-abn's CUDA kernels do not run on {name} (compute capability "
                f"{major}.{minor}, sm_{major}{minor}): {first_line}; it was built for other GPU "
                "architectures (see TORCH_CUDA_ARCH_LIST in tools/build_inplace_abn.sh)")
    return None


def _say_once(message):
    if message not in _said:
        _said.add(message)
        warnings.warn(message, stacklevel=3)


_said = set()


def default_abn_kind():
    """InPlaceABN where it is importable, else the pure ABN (said once)."""
    if InPlaceABN is None:
        _say_once(f"inplace_abn is not importable ({_IMPORT_ERROR}); using the pure-PyTorch ABN, "
                  "which computes the same function with more memory. Run `make setup` to build "
                  "inplace-abn.")
        return "pure"
    return "inplace"


def ABN(num_features, activation="leaky_relu", activation_param=1e-6, kind=None):
    """An ABN layer of `kind` (one of ABN_KINDS; None: default_abn_kind())."""
    kind = kind or default_abn_kind()
    if kind == "inplace":
        if InPlaceABN is None:
            raise ValueError(f"ABN kind 'inplace' but inplace_abn is not importable ({_IMPORT_ERROR})")
        return _InPlaceABN(num_features, activation=activation, activation_param=activation_param)
    if kind not in ABN_KINDS:
        raise ValueError(f"ABN kind must be one of {ABN_KINDS}, got {kind!r}")
    cls = NativeABN if kind == "native" else PureABN
    return cls(num_features, activation=activation, activation_param=activation_param)


def abn_kind(module):
    """'inplace', 'pure' or 'native' for an ABN layer, None for anything else."""
    if isinstance(module, NativeABN):
        return "native"
    if isinstance(module, PureABN):
        return "pure"
    if InPlaceABN is not None and isinstance(module, InPlaceABN):
        return "inplace"
    return None


def is_abn(module):
    return abn_kind(module) is not None
