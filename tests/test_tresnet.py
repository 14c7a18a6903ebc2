import pytest
import torch
import torch.nn as nn

from cmal.tresnet import TResnetL_V2
from cmal.tresnet.layers import AntiAliasDownsample, SpaceToDepth
from tests.conftest import SMALL, load_fixture


def test_state_dict_matches_published_layout(abn_impl):
    ref = load_fixture("tresnet_l_v2_state_dict.json")
    model = TResnetL_V2({"num_classes": 196, "abn": abn_impl})
    ours = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert ours == ref["entries"]
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == ref["num_parameters"]


def test_builds_without_touching_cuda(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("construction must not call .cuda()")
    monkeypatch.setattr(torch.Tensor, "cuda", refuse)
    monkeypatch.setattr(nn.Module, "cuda", refuse)
    TResnetL_V2({"num_classes": 10, **SMALL})


def test_space_to_depth_channel_order():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    x = nn.functional.pad(x, (0, 24, 0, 24))  # 32 x 32, the smallest accepted side
    y = SpaceToDepth()(x)
    assert y.shape == (2, 48, 8, 8)
    for row in range(4):
        for col in range(4):
            for c in range(3):
                torch.testing.assert_close(y[:, (row * 4 + col) * 3 + c], x[:, c, row::4, col::4])


def test_anti_alias_filter_is_not_saved_and_blurs():
    layer = AntiAliasDownsample(channels=2)
    assert len(layer.state_dict()) == 0
    x = torch.ones(1, 2, 6, 6)
    torch.testing.assert_close(layer(x), torch.ones(1, 2, 3, 3))


@pytest.mark.parametrize("side, sizes", [(368, (92, 46, 23, 12)), (224, (56, 28, 14, 7))])
def test_stage_sizes_full_network(side, sizes):
    model = TResnetL_V2({"num_classes": 5}).eval()
    body = model.body
    with torch.no_grad():
        x = body.conv1(body.SpaceToDepth(torch.randn(1, 3, side, side)))
        for stage, size, ch in zip([body.layer1, body.layer2, body.layer3, body.layer4], sizes,
                                   (256, 512, 1024, 2048)):
            x = stage(x)
            assert x.shape == (1, ch, size, size)
        assert model.head(model.global_pool(x)).shape == (1, 5)


def test_non_square_and_small_variant():
    model = TResnetL_V2({"num_classes": 3, **SMALL})
    out = model(torch.randn(2, 3, 96, 64))
    assert out.shape == (2, 3)
    assert model.stage_channels == [128, 256, 512]


@pytest.mark.parametrize("shape", [(1, 3, 100, 98), (1, 3, 28, 28)])
def test_bad_input_side_is_a_clear_error(shape):
    model = TResnetL_V2({"num_classes": 3, **SMALL})
    with pytest.raises(ValueError, match="multiple of 4 and at least 32"):
        model(torch.randn(*shape))


def test_bad_model_params():
    with pytest.raises(ValueError, match="num_classes"):
        TResnetL_V2({})
    with pytest.raises(ValueError, match="unknown model_params"):
        TResnetL_V2({"num_classes": 3, "widht_factor": 0.5})


def test_initialisation_follows_tresnet():
    model = TResnetL_V2({"num_classes": 7, **SMALL})
    for block in model.body.layer1:
        assert torch.all(block.conv3[1].weight == 0)
    assert torch.all(model.body.conv1[1].weight == 1)
    assert model.head.fc.weight.std() < 0.02
