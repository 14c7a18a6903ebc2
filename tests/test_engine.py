"""train_step, evaluate and the attention helpers against a transcription of the reference."""
import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cmal.engine import evaluate, train_step
from cmal.optimizer import make_optimizer
from cmal.model import build_cmal
from tests.conftest import TINY_NET
from cmal.utils import attention_im, cosine_anneal_schedule, highlight_im, map_generate


# ---- the reference's per-sample helpers, transcribed (the loops this project batches) --------
def ref_map_generate(attention_map, pred, p1, p2):
    batches, feaC, feaH, feaW = attention_map.size()
    out_map = torch.zeros_like(attention_map.mean(1))
    for b in range(batches):
        m = attention_map[b].reshape(feaC, feaH * feaW).permute(1, 0)
        m = torch.mm(m, p1.permute(1, 0)).permute(1, 0)
        m = m.reshape(m.size(0), feaH * feaW).permute(1, 0)
        out_map[b] = torch.mm(m, p2[pred[b].argmax()].unsqueeze(1)).reshape(feaH, feaW)
    return out_map


def _ref_norm(m):
    return (m - m.min()) / (m.max() - m.min() + 1e-6)


def _ref_up(m, H, W):
    return F.interpolate(m[None, None], size=(H, W), mode="bilinear", align_corners=True).squeeze()


def _ref_crop(image, mask, theta, padding_ratio):
    _, H, W = image.shape
    nz = torch.nonzero(mask >= theta, as_tuple=False)
    h0 = max(int(nz[:, 0].min().item() - padding_ratio * H), 0)
    h1 = min(int(nz[:, 0].max().item() + padding_ratio * H), H)
    w0 = max(int(nz[:, 1].min().item() - padding_ratio * W), 0)
    w1 = min(int(nz[:, 1].max().item() + padding_ratio * W), W)
    crop = image[:, h0:h1, w0:w1].unsqueeze(0)
    return F.interpolate(crop, size=(H, W), mode="bilinear", align_corners=True).squeeze(0)


def ref_attention_im(images, attention_map, theta=0.5, padding_ratio=0.1):
    _, _, H, W = images.shape
    return torch.stack([_ref_crop(img, _ref_norm(_ref_up(m, H, W)), theta, padding_ratio)
                        for img, m in zip(images, attention_map)])


def ref_highlight_im(images, m1, m2, m3, theta=0.5, padding_ratio=0.1):
    _, _, H, W = images.shape
    out = []
    for b, img in enumerate(images):
        total = sum(_ref_norm(_ref_up(m[b], H, W)) for m in (m1, m2, m3))
        out.append(_ref_crop(img, _ref_norm(total), theta, padding_ratio))
    return torch.stack(out)


def ref_iteration(net, optimizer, inputs, targets, epoch, nb_epoch, base_lrs):
    """One iteration as the published training script writes it (with DataParallel removed)."""
    ce = nn.CrossEntropyLoss()
    for g, lr in zip(optimizer.param_groups, base_lrs):
        g["lr"] = cosine_anneal_schedule(epoch, nb_epoch, lr)
    optimizer.zero_grad(set_to_none=False)
    o1, o2, o3, _, map1, map2, map3 = net(inputs)
    loss3 = ce(o3, targets)
    loss3.backward()
    optimizer.step()
    sd = net.state_dict()
    att3 = ref_map_generate(map3, o3, sd["classifier3.1.weight"], sd["classifier3.4.weight"])
    att2 = ref_map_generate(map2, o2, sd["classifier2.1.weight"], sd["classifier2.4.weight"])
    att1 = ref_map_generate(map1, o1, sd["classifier1.1.weight"], sd["classifier1.4.weight"])
    inputs_att = ref_highlight_im(inputs, att1, att2, att3)
    in1, in2, in3 = (ref_attention_im(inputs, a) for a in (att1, att2, att3))
    optimizer.zero_grad(set_to_none=False)
    flag = torch.rand(1)
    x2 = in3 if flag < 1 / 3 else in1 if flag < 2 / 3 else inputs
    loss2 = ce(net(x2)[1], targets)
    loss2.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    flag = torch.rand(1)
    x1 = in3 if flag < 1 / 3 else in2 if flag < 2 / 3 else inputs
    loss1 = ce(net(x1)[0], targets)
    loss1.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    a = net(inputs_att)
    loss_att = ce(a[0], targets) + ce(a[1], targets) + ce(a[2], targets) + ce(a[3], targets) * 2
    loss_att.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    out_concat = net(inputs)[3]
    loss_concat = ce(out_concat, targets) * 2
    loss_concat.backward()
    optimizer.step()
    return [loss1.item(), loss2.item(), loss3.item(), loss_att.item(), loss_concat.item()]


def _tiny(num_classes=4, abn="pure"):
    torch.manual_seed(0)
    return build_cmal(num_classes, abn=abn, **TINY_NET)


def _batch(n=4, side=64, num_classes=4):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 3, side, side, generator=g), torch.arange(n) % num_classes


# ---- attention helpers -------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("theta, padding", [(0.5, 0.1), (0.3, 0.0), (0.8, 0.25)])
def test_batched_helpers_equal_reference_loops(seed, theta, padding):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(4, 3, 56, 40, generator=g)
    maps = [torch.randn(4, 7, 5, generator=g) for _ in range(3)]
    for m in maps:
        m[1] = m[1].abs() * 3  # a different dynamic range per sample
    fm, pred = torch.randn(4, 16, 7, 5, generator=g), torch.randn(4, 6, generator=g)
    p1, p2 = torch.randn(9, 16, generator=g), torch.randn(6, 9, generator=g)
    torch.testing.assert_close(map_generate(fm, pred, p1, p2), ref_map_generate(fm, pred, p1, p2),
                               rtol=1e-4, atol=1e-4)
    try:
        expected = ref_attention_im(images, maps[0], theta, padding)
    except RuntimeError:  # the reference crashes on an empty crop; covered by another test
        pytest.skip("degenerate box for the reference")
    torch.testing.assert_close(attention_im(images, maps[0], theta, padding), expected,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(highlight_im(images, *maps, theta, padding),
                               ref_highlight_im(images, *maps, theta, padding), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", ["constant", "zero", "nan", "inf"])
def test_empty_or_non_finite_map_keeps_the_whole_image(bad):
    images = torch.randn(3, 3, 32, 24)
    maps = torch.rand(3, 4, 3)
    maps[1] = {"constant": 0.7, "zero": 0.0, "nan": float("nan"), "inf": float("inf")}[bad]
    if bad in ("nan", "inf"):
        maps[1, 0, 0] = 0.2  # a single bad value is enough
    out = attention_im(images, maps)
    assert torch.equal(out[1], images[1])
    torch.testing.assert_close(out[0], ref_attention_im(images[:1], maps[:1])[0])
    assert torch.equal(highlight_im(images, maps, maps, maps)[1], images[1])


def test_degenerate_box_keeps_the_whole_image():
    images = torch.randn(1, 3, 16, 16)
    m = torch.zeros(1, 16, 16)
    m[0, 5, 5] = 1.0  # one pixel, no padding: the reference's crop would be empty and crash
    assert torch.equal(attention_im(images, m, theta=0.5, padding_ratio=0.0), images)


def test_cosine_schedule():
    assert cosine_anneal_schedule(0, 200, 0.002) == pytest.approx(0.002)
    assert cosine_anneal_schedule(100, 200, 0.002) == pytest.approx(0.001)
    assert cosine_anneal_schedule(199, 200, 0.002) == pytest.approx(0.002 / 2 * (np.cos(np.pi * 199 / 200) + 1))
    assert cosine_anneal_schedule(200, 200, 0.002) == pytest.approx(0.002)


# ---- one iteration ------------------------------------------------------------------------
def test_optimizer_groups():
    net = _tiny()
    opt = make_optimizer(net)
    heads = [net.classifier_concat, net.conv_block1, net.classifier1, net.conv_block2,
             net.classifier2, net.conv_block3, net.classifier3, net.Features]
    assert len(opt.param_groups) == 8
    for group, module in zip(opt.param_groups, heads):
        assert [id(p) for p in group["params"]] == [id(p) for p in module.parameters()]
    assert [g["lr"] for g in opt.param_groups] == [0.002] * 7 + [0.0002]
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 5e-4 for g in opt.param_groups)


def test_five_passes_five_steps_and_schedule():
    net = _tiny()
    opt = make_optimizer(net)
    forwards, steps = [], []
    net.register_forward_hook(lambda *a: forwards.append(1))
    opt.register_step_post_hook(lambda *a: steps.append(1))
    inputs, targets = _batch()
    out = train_step(net, opt, inputs, targets, nn.CrossEntropyLoss(), epoch=30, nb_epoch=40)
    assert len(forwards) == 5 and len(steps) == 5
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [cosine_anneal_schedule(30, 40, 0.002)] * 7 + [cosine_anneal_schedule(30, 40, 0.0002)])
    assert set(out) == {"loss1", "loss2", "loss3", "loss_att", "loss_concat", "logits_concat",
                        "correct"}
    assert all(isinstance(out[k], float) for k in out if k not in ("logits_concat", "correct"))
    assert out["logits_concat"].shape == (4, 4)
    assert out["correct"] == int((out["logits_concat"].argmax(1) == targets).sum())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_train_step_equals_the_reference_iteration(seed):
    """Same weights, buffers and losses as the transcribed reference, over two iterations
    (the second one runs with momentum and zero-filled gradients)."""
    ours = _tiny()
    ref = copy.deepcopy(ours)
    opt_ours, opt_ref = make_optimizer(ours), make_optimizer(ref)
    base = [g["base_lr"] for g in opt_ref.param_groups]
    ce = nn.CrossEntropyLoss()
    for it in range(2):
        inputs, targets = _batch()
        torch.manual_seed(seed * 10 + it)
        got = train_step(ours, opt_ours, inputs, targets, ce, epoch=3, nb_epoch=10)
        state_after_ours = torch.get_rng_state()
        torch.manual_seed(seed * 10 + it)
        expected = ref_iteration(ref, opt_ref, inputs, targets, 3, 10, base)
        assert torch.equal(state_after_ours, torch.get_rng_state())  # exactly two draws
        assert [got[k] for k in ("loss1", "loss2", "loss3", "loss_att", "loss_concat")] == \
            pytest.approx(expected, rel=1e-4, abs=1e-5)
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_every_parameter_moves_at_every_step_after_the_first_iteration():
    # Zero-filled gradients (not None): weight decay and momentum act on heads a step ignores.
    net = _tiny()
    opt = make_optimizer(net)
    inputs, targets = _batch()
    train_step(net, opt, inputs, targets, nn.CrossEntropyLoss())
    before = net.classifier1[4].weight.detach().clone()
    opt.zero_grad(set_to_none=False)
    net(inputs)[2].sum().backward()  # a loss that does not reach classifier1
    opt.step()
    assert not torch.equal(before, net.classifier1[4].weight)


def test_non_finite_loss_raises():
    from cmal.engine import NonFiniteError
    net = _tiny()
    opt = make_optimizer(net)
    inputs, targets = _batch()
    inputs[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="loss"):
        train_step(net, opt, inputs, targets, nn.CrossEntropyLoss())


# ---- evaluation ---------------------------------------------------------------------------
def test_evaluate_matches_a_direct_computation():
    net = _tiny()
    inputs, targets = _batch(n=7)
    loader = [(inputs[:4], targets[:4], 0), (inputs[4:], targets[4:], 0)]
    got = evaluate(net, loader, nn.CrossEntropyLoss())
    net.eval()
    with torch.no_grad():
        out = net(inputs)
        atts = [ref_map_generate(out[4 + i], out[i], getattr(net, f"classifier{i + 1}")[1].weight,
                                 getattr(net, f"classifier{i + 1}")[4].weight) for i in range(3)]
        out_att = net(ref_highlight_im(inputs, *atts))
    com2 = out[0] + out[1] + out[2] + out[3]
    com = com2 + out_att[0] + out_att[1] + out_att[2] + out_att[3]
    assert got["samples"] == 7
    assert got["acc_concat"] == pytest.approx(100 * (out[3].argmax(1) == targets).float().mean().item())
    assert got["acc_com2"] == pytest.approx(100 * (com2.argmax(1) == targets).float().mean().item())
    assert got["acc_combined"] == pytest.approx(100 * (com.argmax(1) == targets).float().mean().item())
    assert got["loss"] == pytest.approx(F.cross_entropy(out[3], targets).item(), rel=1e-5)
