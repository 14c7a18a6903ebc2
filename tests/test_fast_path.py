"""The levers of the fast training path, as far as the CPU can check them: the native ABN computes
the pure ABN's function without converting activations under autocast, the network compiles
without graph breaks, foreach SGD is the reference's per-parameter SGD, and bf16 learns as fp32
does on a fixed batch. tests/test_cuda.py repeats what matters on a GPU."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from cmal import distributed
from cmal.engine import train_step
from cmal.optimizer import load_optimizer_state, make_optimizer
from cmal.model import build_cmal
from cmal.precision import Precision
from cmal.tresnet import NativeABN, PureABN, abn_kind, abn_kind_for
from tests.conftest import TINY_NET



def _abn_pair(activation, training):
    pure = PureABN(6, activation=activation, activation_param=0.01).train(training)
    native = NativeABN(6, activation=activation, activation_param=0.01).train(training)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            value = torch.randn(6, generator=g)
            getattr(pure, name).copy_(value), getattr(native, name).copy_(value)
        pure.weight[0] = native.weight[0] = 0.0  # TResNet's zero-initialised residual scales
        var = torch.rand(6, generator=g) + 0.5
        pure.running_var.copy_(var), native.running_var.copy_(var)
    return pure, native


@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
@pytest.mark.parametrize("training", [True, False])
def test_native_abn_equals_pure_abn(activation, training):
    pure, native = _abn_pair(activation, training)
    x = torch.randn(4, 6, 5, 7) * 3 + 1
    grad = torch.randn_like(x)
    results = []
    for m in (pure, native):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(grad)
        results.append((y.detach(), xi.grad, m.weight.grad, m.bias.grad, m.running_mean,
                        m.running_var, m.num_batches_tracked))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    assert results[1][2][0] != 0  # the zero scale still learns


def test_native_abn_computes_in_bf16_with_float32_statistics():
    native = NativeABN(6).train()
    y = native(torch.randn(4, 6, 5, 7).bfloat16())
    assert y.dtype == torch.bfloat16
    assert native.running_mean.dtype == native.running_var.dtype == torch.float32


class _CastsInside(TorchDispatchMode):
    """Dtype conversions of activations (batch-sized tensors), by the ABN module running them."""

    def __init__(self, net, batch):
        super().__init__()
        self.batch, self.inside, self.casts = batch, [], []
        for module in net.modules():
            if abn_kind(module):
                module.register_forward_pre_hook(self._enter)
                module.register_forward_hook(self._leave)

    def _enter(self, module, inputs):
        self.inside.append(module)

    def _leave(self, module, inputs, output):
        self.inside.pop()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        x = args[0] if args else None
        if (func is torch.ops.aten._to_copy.default and x.dim() == 4
                and x.shape[0] == self.batch and self.inside):
            self.casts.append((tuple(x.shape), x.dtype, (kwargs or {}).get("dtype")))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("abn, converts", [("pure", True), ("native", False)])
def test_no_activation_is_converted_at_an_abn_under_autocast(abn, converts):
    torch.manual_seed(0)
    net = build_cmal(4, abn=abn, **TINY_NET)
    x = torch.randn(4, 3, 64, 64)
    spy = _CastsInside(net, batch=4)
    with torch.autocast("cpu", dtype=torch.bfloat16), spy:
        out = net(x)
    assert out[0].dtype == torch.bfloat16
    # The pure ABN normalises in float32: two conversions per layer, which the spy must see.
    assert bool(spy.casts) == converts, spy.casts[:4]


def test_network_compiles_without_graph_breaks():
    torch.manual_seed(0)
    net = build_cmal(4, abn="native", **TINY_NET)
    explanation = torch._dynamo.explain(net)(torch.randn(4, 3, 64, 64))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def _two_steps(impl, amp_dtype=None, abn="pure", iterations=2, device="cpu", snapshots=None):
    """`iterations` CMAL-Net iterations of the tiny network on a fixed batch; with a list as
    `snapshots`, the network's state before each iteration and after the last is appended."""
    torch.manual_seed(0)
    net = build_cmal(4, abn=abn, **TINY_NET).to(device)
    optimizer = make_optimizer(net, lr=0.01, backbone_lr=0.01, impl=impl)
    x, y = _fixed_batch(device)
    precision = Precision.of_dtype(amp_dtype, device)
    losses = []
    for seed in range(iterations):
        if snapshots is not None:
            snapshots.append(copy.deepcopy(net.state_dict()))
        torch.manual_seed(seed)
        losses.append(train_step(net, optimizer, x, y, nn.CrossEntropyLoss(), precision=precision))
    if snapshots is not None:
        snapshots.append(copy.deepcopy(net.state_dict()))
    return net, optimizer, losses


def _fixed_batch(device="cpu"):
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 64, 64, generator=g).to(device), torch.arange(4, device=device)


def test_foreach_sgd_is_the_reference_per_parameter_sgd_bit_for_bit():
    loop, loop_opt, _ = _two_steps("loop")
    foreach, foreach_opt, _ = _two_steps("foreach")
    assert foreach_opt.param_groups[0]["foreach"] and not loop_opt.param_groups[0]["foreach"]
    for (name, a), b in zip(loop.state_dict().items(), foreach.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(loop_opt.state.values(), foreach_opt.state.values()):
        assert torch.equal(a["momentum_buffer"], b["momentum_buffer"])


def test_fused_sgd_computes_the_same_update():
    loop, _, _ = _two_steps("loop")
    fused, fused_opt, _ = _two_steps("fused")
    assert fused_opt.param_groups[0]["fused"]
    for (name, a), b in zip(loop.state_dict().items(), fused.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_resume_keeps_this_runs_sgd_implementation():
    _, saved, _ = _two_steps("loop")
    net = build_cmal(4, abn="pure", **TINY_NET)
    optimizer = make_optimizer(net, impl="foreach")
    load_optimizer_state(optimizer, copy.deepcopy(saved.state_dict()))
    assert all(g["foreach"] and not g["fused"] for g in optimizer.param_groups)
    assert optimizer.param_groups[0]["lr"] == saved.param_groups[0]["lr"]


# What "bf16 learns as fp32" means, and the tolerances, derived from bf16 itself rather than from
# one machine's run. bf16 keeps 8 significant bits: every rounding is off by at most u = 2**-8.
# The tiny network has about 20 rounded stages in series (stem, 4 blocks of 3 convolutions and an
# SE pair, a head's 2 convolutions and 2 linear layers); independent roundings add as a random
# walk, sqrt(20) * u = 1.7 % on the loss, hence LOSS_TOLERANCE. The gradient direction decides
# what a step learns: a step along a direction at cosine c to fp32's descends at least c times
# as far to first order, so GRADIENT_COSINE = 0.9 is "each bf16 step makes 90 % of fp32's
# progress". Whole trajectories are not compared iteration by iteration: from the second pass
# on, the attention crops come from maps in which a one-ulp change moves a box edge by a pixel,
# and kernels that sum in another order (AVX2, AVX-512 with native bf16 dot products, AMX, CUDA)
# then follow different but equally valid paths; what must hold on every one is that each state
# is computed within bf16's precision and that the run learns.
LOSS_TOLERANCE = 0.02
GRADIENT_COSINE = 0.9
LEARNED = 0.25  # the concatenation head's loss after 6 iterations, as a fraction of its first


def _heads_loss_and_gradient(state, abn, device, amp_dtype):
    """Every head's cross entropy on the fixed batch (train mode: batch statistics, as in every
    training pass) and its gradient, for the network with weights `state`."""
    net = build_cmal(4, abn=abn, **TINY_NET).to(device)
    net.load_state_dict(state)
    x, y = _fixed_batch(device)
    with torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype or torch.float32,
                        enabled=amp_dtype is not None):
        out = net(x)
    loss = sum(nn.functional.cross_entropy(logits.float(), y)
               for logits in (out.logits1, out.logits2, out.logits3, out.logits_concat))
    loss.backward()
    gradient = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    return loss.item(), gradient


def check_bf16_learns_as_fp32(device):
    """The fast path (native ABN, fused SGD, bf16 autocast) against the reference set-up (pure
    ABN, per-parameter SGD, fp32): at every state of fp32's 6 iterations on a fixed batch, bf16's
    loss and gradient agree within bf16's precision; bf16's own first pass agrees with fp32's;
    and both runs learn the batch."""
    states = []
    *_, reference = _two_steps("loop", iterations=6, device=device, snapshots=states)
    *_, fast = _two_steps("fused", amp_dtype=torch.bfloat16, abn="native", iterations=6,
                          device=device)
    assert fast[0]["loss3"] == pytest.approx(reference[0]["loss3"], rel=LOSS_TOLERANCE)
    for i, state in enumerate(states):
        loss, gradient = _heads_loss_and_gradient(state, "pure", device, None)
        fast_loss, fast_gradient = _heads_loss_and_gradient(state, "native", device,
                                                            torch.bfloat16)
        assert fast_loss == pytest.approx(loss, rel=LOSS_TOLERANCE), i
        cosine = nn.functional.cosine_similarity(gradient, fast_gradient, dim=0).item()
        assert cosine >= GRADIENT_COSINE, (i, cosine)
    for run in (reference, fast):
        assert run[-1]["loss_concat"] < LEARNED * run[0]["loss_concat"], run


def test_bf16_native_path_learns_as_fp32_on_a_fixed_batch():
    check_bf16_learns_as_fp32("cpu")


def test_auto_abn_kinds():
    assert abn_kind_for("auto", "cpu") == "pure"
    assert abn_kind_for("auto", "cpu", amp=True) == "pure"
    assert abn_kind_for("auto", "cuda", amp=True) == "native"
    assert abn_kind_for("native", "cpu") == "native"


def test_more_ranks_than_gpus_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(distributed.GpuCountError, match=r"--nproc_per_node=1 .*--device=cpu"):
        distributed.check_gpus_per_node()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    distributed.check_gpus_per_node()


def test_reflection_padding_from_slices_equals_f_pad():
    from cmal.tresnet.layers import _reflect_pad_1
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    grad = torch.randn(2, 3, 7, 8)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    assert torch.equal(_reflect_pad_1(x), padded)
    a, = torch.autograd.grad(_reflect_pad_1(x), x, grad)
    b, = torch.autograd.grad(padded, x, grad)
    torch.testing.assert_close(a, b)
