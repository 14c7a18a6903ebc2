import pytest
import torch

from cmal.tresnet import PureABN, TResnetL_V2, inplace_abn_available
from cmal.tresnet.abn import ABN
from tests.conftest import SMALL

needs_inplace_abn = pytest.mark.skipif(not inplace_abn_available(),
                                       reason="inplace_abn is not installed (make setup builds it)")


def _pair(activation, training, weight):
    from inplace_abn import InPlaceABN
    mods = [InPlaceABN(weight.numel(), activation=activation, activation_param=1e-6),
            PureABN(weight.numel(), activation=activation, activation_param=1e-6)]
    g = torch.Generator().manual_seed(1)
    bias, mean, var = torch.randn(weight.numel(), generator=g), torch.randn(weight.numel(), generator=g), \
        torch.rand(weight.numel(), generator=g) + 0.5
    for m in mods:
        with torch.no_grad():
            m.weight.copy_(weight)
            m.bias.copy_(bias)
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
        m.train(training)
    return mods


@needs_inplace_abn
@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
@pytest.mark.parametrize("training", [True, False])
def test_pure_abn_equals_inplace_abn(activation, training):
    weight = torch.tensor([0.7, -0.3, 1.5, -2.0, 0.05, -0.9])  # negative scales: |w| + eps
    inplace, pure = _pair(activation, training, weight)
    x = torch.randn(4, 6, 5, 7) * 3 + 1
    grad = torch.randn_like(x)
    outs, grads = [], []
    for m in (inplace, pure):
        xi = x.clone().requires_grad_()
        y = m(xi * 1.0)  # InPlaceABN overwrites its input: give it a fresh tensor
        outs.append(y.detach().clone())
        y.backward(grad)
        grads.append((xi.grad, m.weight.grad, m.bias.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(inplace, name), getattr(pure, name))
    assert int(pure.num_batches_tracked) == int(training)


def test_pure_abn_formula():
    m = PureABN(3, activation="leaky_relu", activation_param=0.1).eval()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([-2.0, 0.0, 1.0]))
        m.bias.copy_(torch.tensor([0.5, -1.0, 0.0]))
        m.running_mean.copy_(torch.tensor([1.0, 2.0, 3.0]))
        m.running_var.copy_(torch.tensor([4.0, 1.0, 0.25]))
    x = torch.randn(2, 3, 4, 4)
    xhat = (x - m.running_mean.view(1, 3, 1, 1)) / torch.sqrt(m.running_var.view(1, 3, 1, 1) + 1e-5)
    z = xhat * (m.weight.abs() + 1e-5).view(1, 3, 1, 1) + m.bias.view(1, 3, 1, 1)
    torch.testing.assert_close(m(x), torch.nn.functional.leaky_relu(z, 0.1))


def test_pure_abn_running_stats_use_unbiased_variance():
    m = PureABN(2).train()
    x = torch.randn(3, 2, 4, 4) * 2
    m(x)
    var = x.transpose(0, 1).reshape(2, -1).var(1, unbiased=True)
    torch.testing.assert_close(m.running_var, 0.9 * torch.ones(2) + 0.1 * var)


def test_zero_weight_still_learns():
    # TResNet initialises every conv3 ABN scale to 0; the gradient there must not vanish.
    m = PureABN(2, activation="identity")
    with torch.no_grad():
        m.weight.zero_()
    m(torch.randn(4, 2, 3, 3)).pow(2).mul(torch.randn(4, 2, 3, 3)).sum().backward()
    assert torch.all(m.weight.grad != 0)


def test_kind_pure_builds_pure_everywhere():
    assert isinstance(ABN(4, kind="pure"), PureABN)
    model = TResnetL_V2({"num_classes": 3, **SMALL, "abn": "pure"})
    assert isinstance(model.body.conv1[1], PureABN)


@needs_inplace_abn
def test_default_is_inplace_abn_when_installed():
    from inplace_abn import InPlaceABN
    assert isinstance(ABN(4), InPlaceABN)


@needs_inplace_abn
def test_whole_backbone_same_with_both(monkeypatch):
    torch.manual_seed(3)
    a = TResnetL_V2({"num_classes": 4, **SMALL, "abn": "inplace"})
    b = TResnetL_V2({"num_classes": 4, **SMALL, "abn": "pure"})
    with torch.no_grad():  # non-trivial scales, negatives included
        for p in a.parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.5 + 0.5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 3, 64, 64)
    for training in (True, False):
        a.train(training), b.train(training)
        ya, yb = a(x), b(x)
        torch.testing.assert_close(ya, yb, rtol=1e-4, atol=1e-5)
        ya.sum().backward(), yb.sum().backward()
        ga = {n: p.grad for n, p in a.named_parameters()}
        for n, p in b.named_parameters():
            torch.testing.assert_close(ga[n], p.grad, rtol=1e-3, atol=1e-4, msg=n)
        a.zero_grad(), b.zero_grad()
    for (n, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("activation", ["leaky_relu", "identity"])
@pytest.mark.parametrize("training", [True, False])
def test_pure_abn_backward_is_the_true_gradient(activation, training):
    m = PureABN(3, activation=activation, activation_param=0.2).double().train(training)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.8, -1.3, 0.4]))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    x = torch.randn(3, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w, b: _functional(m, state, x, w, b), (x, w, b))


def _functional(m, state, x, w, b):
    """PureABN as a function of (input, weight, bias), for gradcheck."""
    from cmal.tresnet.abn import _ABNFunction
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    slope = m.activation_param if m.activation == "leaky_relu" else None
    return _ABNFunction.apply(flat, w, b, state["running_mean"].clone(), state["running_var"].clone(),
                              m.training, m.momentum, m.eps, slope)


def _gpu_problem(monkeypatch, problem):
    from cmal.tresnet import abn
    monkeypatch.setattr(abn, "inplace_abn_gpu_problem", lambda device: problem)
    monkeypatch.setattr(abn, "_said", set())


@needs_inplace_abn
def test_inplace_abn_built_for_another_gpu_falls_back_to_native_saying_so(monkeypatch):
    from cmal.tresnet import abn_kind_for
    _gpu_problem(monkeypatch, "inplace-abn's CUDA kernels do not run on GPU X (sm_80)")
    with pytest.warns(UserWarning, match=r"sm_80.*using the native ABN.*build_inplace_abn\.sh"):
        assert abn_kind_for("auto", "cuda") == "native"
    assert abn_kind_for("auto", "cuda", amp=True) == "native"
    with pytest.raises(ValueError, match=r"--abn=inplace: .*sm_80.*Rebuild.*or use --abn=native"):
        abn_kind_for("inplace", "cuda")


@needs_inplace_abn
def test_inplace_abn_that_fits_the_gpu_is_kept(monkeypatch):
    from cmal.tresnet import abn_kind_for
    _gpu_problem(monkeypatch, None)
    assert abn_kind_for("auto", "cuda") == "inplace"
    assert abn_kind_for("inplace", "cuda") == "inplace"
