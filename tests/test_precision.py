"""Mixed precision, channels-last and torch.compile on the CPU; off, they change nothing."""
import copy
import math

import pytest
import torch
import torch.nn as nn

from cmal import checkpoint as ckpt_io
from cmal import train
from cmal.engine import evaluate, train_step
from cmal.model import compile_network
from cmal.optimizer import make_optimizer
from cmal.model import build_cmal
from cmal.precision import Precision
from tests.conftest import TINY_ARGS, TINY_NET
from tests.test_fast_path import LOSS_TOLERANCE

LOSSES = ("loss1", "loss2", "loss3", "loss_att", "loss_concat")


def _pair(abn):
    torch.manual_seed(0)
    net = build_cmal(4, abn=abn, **TINY_NET)
    return net, copy.deepcopy(net)


def _step(net, x, y, seed=1, **kwargs):
    opt = make_optimizer(net)
    torch.manual_seed(seed)
    return train_step(net, opt, x, y, nn.CrossEntropyLoss(), **kwargs)


def _batch(channels_last=False):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 64, 64, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.arange(4)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_step_close_to_float32(abn_impl, amp):
    ref, net = _pair(abn_impl)
    x, y = _batch()
    expected = _step(ref, x, y)
    precision = Precision(amp, "cpu")
    if amp == "fp16":
        precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    got = _step(net, x, y, precision=precision)
    # The first pass sees the same input and weights: it agrees within bf16's precision (fp16
    # keeps 3 more bits). The later passes' crops can move by a pixel with any rounding, so they
    # are compared state by state in test_fast_path.check_bf16_learns_as_fp32; here they must
    # only be computed.
    assert got["loss3"] == pytest.approx(expected["loss3"], rel=LOSS_TOLERANCE)
    for k in LOSSES:
        assert math.isfinite(got[k]), k
    # Evaluation under autocast scores the same trained network as float32 does.
    batch = [(x, y, 0)]
    reference = evaluate(net, batch, nn.CrossEntropyLoss())
    result = evaluate(net, batch, nn.CrossEntropyLoss(), precision=precision)
    assert result["loss"] == pytest.approx(reference["loss"], rel=LOSS_TOLERANCE)
    for k in ("acc_concat", "acc_com2"):  # 4 samples: one flipped prediction is 25 points
        assert abs(result[k] - reference[k]) <= 25, k


def test_channels_last_equals_float32(abn_impl):
    ref, net = _pair(abn_impl)
    x, y = _batch()
    expected = _step(ref, x, y)
    got = _step(net.to(memory_format=torch.channels_last), *_batch(channels_last=True))
    for k in LOSSES:
        assert got[k] == pytest.approx(expected[k], rel=1e-4), k
    for (name, a), b in zip(ref.state_dict().items(), net.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_step_equals_eager():
    ref, net = _pair("pure")
    x, y = _batch()
    expected = [_step(ref, x, y, seed=s) for s in (1, 2)]
    compiled = compile_network(net)
    got = [_step(compiled, x, y, seed=s) for s in (1, 2)]
    # Compiled kernels sum in another order. The passes on the raw batch agree to 1e-3; the crop
    # passes amplify that rounding through the boxes (0.17% seen with torch 2.11 on 16 cores).
    for e, g in zip(expected, got):
        for k in LOSSES:
            rel = 1e-3 if k in ("loss3", "loss_concat") else 1e-2
            assert g[k] == pytest.approx(e[k], rel=rel), k


def test_cli_options_train_and_resume(image_folder, tmp_path):
    out = tmp_path / "amp"
    base = {"data_path": str(image_folder), "num_classes": 3, "output_dir": str(out)}
    args = TINY_ARGS + ["--amp=fp16", "--channels_last", "--eval_every=1"]
    assert train.main(base, args + ["--epochs=1"]) == 0
    ck = ckpt_io.load(out / "last.pt")
    assert ck["scaler"] and ck["scaler"]["scale"] > 0 and ck["settings"]["amp"] == "fp16"
    assert train.main(base, args + ["--epochs=2", "--extend", "--resume"]) == 0
    assert ckpt_io.load(out / "last.pt")["epoch"] == 2
    out2 = tmp_path / "bf16"
    assert train.main({**base, "output_dir": str(out2)},
                      TINY_ARGS + ["--amp=bf16", "--epochs=1", "--abn=pure"]) == 0


def test_cli_compile_wraps_the_trained_network(image_folder, tmp_path, monkeypatch):
    # Compiling for real is test_compiled_step_equals_eager's job (a minute and a half here);
    # this checks that --compile hands the network to it and saves plain weights.
    wrapped = []

    def compile_network(net):
        wrapped.append(net)
        return net
    monkeypatch.setattr(train, "compile_network", compile_network)
    assert train.main({"data_path": str(image_folder), "num_classes": 3,
                       "output_dir": str(tmp_path / "c")},
                      TINY_ARGS + ["--compile", "--epochs=1"]) == 0
    assert len(wrapped) == 1 and type(wrapped[0]).__name__ == "CMALNet"
    ck = ckpt_io.load(tmp_path / "c" / "last.pt")
    assert not any(k.startswith("_orig_mod") for k in ck["model"])


def test_precision_is_decided_once_from_amp_and_the_device():
    fp16 = Precision("fp16", "cpu")
    assert fp16.dtype is torch.float16 and isinstance(fp16.new_scaler(), torch.amp.GradScaler)
    # one scaler per Precision, whose state a checkpoint keeps and a resumed run loads back
    assert fp16.scaler is fp16.scaler and fp16.scaler_state() == fp16.scaler.state_dict()
    other = Precision("fp16", "cpu")
    other.load_scaler_state({**fp16.scaler_state(), "scale": 128.0})
    assert other.scaler_state()["scale"] == 128.0
    bf16 = Precision("bf16", "cpu")
    assert bf16.scaler is None and bf16.scaler_state() is None
    assert Precision("none", "cpu").new_scaler() is None and Precision("bf16", "cpu").new_scaler() is None
    # the ABN kind it implies: native under autocast on CUDA, pure on the CPU
    assert Precision("bf16", "cuda").abn_kind("auto") == "native"
    assert Precision("none", "cpu").abn_kind("auto") == "pure"
    assert Precision.of_dtype(torch.bfloat16, "cpu").amp == "bf16"
    with pytest.raises(ValueError, match="--amp"):
        Precision("fp8", "cpu")
