"""The levers of the fast training path, as far as the CPU can check them: the native ABN computes
the pure ABN's function without converting activations under autocast, the network compiles
without graph breaks, foreach SGD is the reference's per-parameter SGD, and bf16 learns as fp32
does on a fixed batch. tests/test_cuda.py repeats what matters on a GPU."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from cmal import distributed as dist
from cmal.engine import train_step
from cmal.optimizer import load_optimizer_state, make_optimizer
from cmal.model import build_cmal
from cmal.tresnet import NativeABN, PureABN, abn_kind, abn_kind_for
from tests.conftest import TINY_NET

LOSSES = ("loss1", "loss2", "loss3", "loss_att", "loss_concat")


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


def _two_steps(impl, amp_dtype=None, abn="pure", iterations=2):
    torch.manual_seed(0)
    net = build_cmal(4, abn=abn, **TINY_NET)
    optimizer = make_optimizer(net, lr=0.01, backbone_lr=0.01, impl=impl)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 3, 64, 64, generator=g), torch.arange(4)
    losses = []
    for seed in range(iterations):
        torch.manual_seed(seed)
        losses.append(train_step(net, optimizer, x, y, nn.CrossEntropyLoss(), amp_dtype=amp_dtype))
    return net, optimizer, losses


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


# Stated tolerances of the fast path against fp32 on a fixed batch. bf16 keeps 8 bits of mantissa:
# the first pass (the same input and weights as fp32) agrees to 2%, the first iteration's other
# passes to 5% (their crops come from maps that can shift a box by a pixel). Later iterations'
# crop passes are chaotic in both precisions (fp32 with another ABN rounding drifts as far), so
# from there on the loss of the concatenation head, on the raw batch, is what is compared.
FIRST_PASS_TOLERANCE = 0.02
FIRST_ITERATION_TOLERANCE = 0.05
CONCAT_LOSS_TOLERANCE = 0.15


def test_bf16_native_path_learns_as_fp32_on_a_fixed_batch():
    *_, reference = _two_steps("loop", iterations=6)
    *_, fast = _two_steps("fused", amp_dtype=torch.bfloat16, abn="native", iterations=6)
    assert fast[0]["loss3"] == pytest.approx(reference[0]["loss3"], rel=FIRST_PASS_TOLERANCE)
    for k in LOSSES:
        assert fast[0][k] == pytest.approx(reference[0][k], rel=FIRST_ITERATION_TOLERANCE), k
    for i, (r, f) in enumerate(zip(reference, fast)):
        assert f["loss_concat"] == pytest.approx(r["loss_concat"], rel=CONCAT_LOSS_TOLERANCE), i
    # Both learn the batch: the concatenation head's loss falls to well under a quarter.
    assert fast[-1]["loss_concat"] < 0.25 * fast[0]["loss_concat"]


def test_auto_abn_kinds():
    assert abn_kind_for("auto", "cpu") == "pure"
    assert abn_kind_for("auto", "cpu", amp=True) == "pure"
    assert abn_kind_for("auto", "cuda", amp=True) == "native"
    assert abn_kind_for("native", "cpu") == "native"


def test_more_ranks_than_gpus_is_refused_with_what_to_do(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(dist.GpuCountError, match=r"--nproc_per_node=1 .*--device=cpu"):
        dist.check_gpus_per_node()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    dist.check_gpus_per_node()


def test_reflection_padding_from_slices_equals_f_pad():
    from cmal.tresnet.layers import _reflect_pad_1
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    grad = torch.randn(2, 3, 7, 8)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
    assert torch.equal(_reflect_pad_1(x), padded)
    a, = torch.autograd.grad(_reflect_pad_1(x), x, grad)
    b, = torch.autograd.grad(padded, x, grad)
    torch.testing.assert_close(a, b)
