import hashlib
import http.server
import os
import socket
import threading
import time
import urllib.request

import pytest
import torch
import torchvision

from cmal.tresnet import TResnetL_V2, WeightsError, load_tresnet_weights
from cmal.tresnet.weights import cache_name, download
from tests.conftest import SMALL


def _small(num_classes=10):
    return TResnetL_V2({"num_classes": num_classes, **SMALL})


def _randomise(model):
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return model


@pytest.mark.parametrize("wrap", [None, "model", "state_dict"])
def test_round_trip_in_published_layout(tmp_path, wrap):
    src = _randomise(_small())
    state = src.state_dict()
    path = tmp_path / "w.pth"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    dst = load_tresnet_weights(_small(), path)
    for (k, a), b in zip(state.items(), dst.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_full_size_round_trip(tmp_path):
    src = _randomise(TResnetL_V2({"num_classes": 196}))
    path = tmp_path / "cars.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = load_tresnet_weights(TResnetL_V2({"num_classes": 196}), path)
    assert torch.equal(dst.body.layer3[22].conv3[0].weight, src.body.layer3[22].conv3[0].weight)
    assert torch.equal(dst.head.fc.weight, src.head.fc.weight)


def test_other_class_count_skips_only_the_head(tmp_path):
    src = _randomise(_small(196))
    path = tmp_path / "w.pth"
    torch.save({"model": src.state_dict()}, path)
    dst = _small(100)
    head_before = dst.head.fc.weight.clone()
    load_tresnet_weights(dst, path)
    assert torch.equal(dst.head.fc.weight, head_before)
    assert torch.equal(dst.body.conv1[0].weight, src.body.conv1[0].weight)


def test_dataparallel_prefix_is_stripped(tmp_path):
    src = _randomise(_small())
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, path)
    dst = load_tresnet_weights(_small(), path)
    assert torch.equal(dst.body.conv1[0].weight, src.body.conv1[0].weight)


def _unchanged(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return lambda: all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(_randomise(_small()).state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model = _small()
    same = _unchanged(model)
    with pytest.raises(WeightsError, match="truncated or corrupt") as err:
        load_tresnet_weights(model, path)
    assert str(path) in str(err.value)
    assert same()


def test_other_architecture_is_refused_with_key_names(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), path)
    model = _small()
    same = _unchanged(model)
    with pytest.raises(WeightsError) as err:
        load_tresnet_weights(model, path)
    msg = str(err.value)
    assert "missing keys: body.conv1.0.weight" in msg
    assert "unexpected keys: conv1.weight" in msg
    assert same()


def test_other_width_is_refused_with_shapes(tmp_path):
    path = tmp_path / "w.pth"
    torch.save(TResnetL_V2({"num_classes": 10, "layers": (1, 1, 1, 1), "width_factor": 0.5})
               .state_dict(), path)
    with pytest.raises(WeightsError, match=r"shape mismatches: body.conv1.0.weight \(file \(32, 48, 3, 3\), "
                                           r"model \(16, 48, 3, 3\)\)"):
        load_tresnet_weights(_small(), path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": _small().state_dict(), "payload": _Evil(marker)}, path)
    with pytest.raises(WeightsError, match="could run arbitrary code"):
        load_tresnet_weights(_small(), path)
    assert not marker.exists()


def test_missing_file_and_non_state_dict(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_tresnet_weights(_small(), tmp_path / "nope.pth")
    path = tmp_path / "list.pth"
    torch.save([1, 2, 3], path)
    with pytest.raises(WeightsError, match="holds no state dict"):
        load_tresnet_weights(_small(), path)


def test_download_times_out_with_a_clear_message(tmp_path):
    # A server that accepts the connection and never answers.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    url = f"http://127.0.0.1:{server.getsockname()[1]}/tresnet.pth"
    try:
        with pytest.raises(WeightsError, match="could not download .*timed out.*local file"):
            download(url, dest_dir=tmp_path, timeout=1.0, progress=False)
    finally:
        server.close()
    assert list(tmp_path.iterdir()) == []


def test_download_unreachable_host(tmp_path):
    with socket.socket() as s:  # a port with no listener: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(WeightsError, match="could not download"):
        load_tresnet_weights(_small(), f"http://127.0.0.1:{port}/w.pth", timeout=1.0)


def test_download_once_into_cache(tmp_path, monkeypatch):
    src = _randomise(_small())
    served = tmp_path / "served"
    served.mkdir()
    torch.save({"model": src.state_dict()}, served / "tresnet.pth")
    hits = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def do_GET(self):
            hits.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setenv("CMAL_CACHE", str(tmp_path / "cache"))
    url = f"http://127.0.0.1:{httpd.server_address[1]}/tresnet.pth"
    try:
        for _ in range(2):
            dst = load_tresnet_weights(_small(), url, progress=False)
            assert torch.equal(dst.body.conv1[0].weight, src.body.conv1[0].weight)
    finally:
        httpd.shutdown()
    assert hits == ["/tresnet.pth"]
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache_name(url)]


# ---- every source: the hub, the publisher's cached files, local files in either key names ----

HUB_REPO = "timm/tresnet_v2_l.miil_in21k"
PUBLISHED_SLOPE = 1e-6  # the published TResNet-V2 code's negative slope for every leaky unit


def _timm_tresnet(**kwargs):
    from timm.models.tresnet import TResNet
    return TResNet(v2=True, **kwargs)


def _as_converted(timm_model):
    """timm's TResNet with statistics and scales as timm's converted files hold them (each scale
    |w| + 1e-5), its leaky slopes set to the published code's; in eval mode."""
    with torch.no_grad():
        for name, m in timm_model.named_modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                # Small residual scales keep a deep random network's activations bounded.
                scale = torch.rand(n) * (0.2 if name.endswith("conv3.bn") else 0.8) + 0.2
                m.weight.copy_(scale.abs() + 1e-5)
                m.bias.copy_(torch.randn(n) * 0.1)
                m.running_mean.copy_(torch.randn(n) * 0.1)
                m.running_var.copy_(torch.rand(n) + 0.5)
            elif isinstance(m, torch.nn.LeakyReLU):
                m.negative_slope = PUBLISHED_SLOPE
    return timm_model.eval()


def _converted_state(timm_model):
    # timm's converted files carry no num_batches_tracked (the publisher's had none).
    return {k: v.contiguous() for k, v in timm_model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def _hub_cache(root, repo_id, files):
    """A HuggingFace hub cache at `root` holding `files` (name -> writer(path)) of `repo_id`, laid
    out as huggingface_hub lays it out: refs/main names the snapshot holding the files."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for name, write in files.items():
        path = repo / "snapshots" / commit / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)
    return root


@pytest.fixture(scope="module")
def full_size_hub(tmp_path_factory):
    """timm's full-size tresnet_v2_l (random, as converted), and a hub cache holding it as
    timm/tresnet_v2_l.miil_in21k's model.safetensors. The head has 100 classes instead of the
    pretraining's 11221 (it is left out anyway), which keeps the file at 190 MB."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    model = _timm_tresnet(layers=[3, 4, 23, 3], num_classes=100)
    slopes = {m.negative_slope for m in model.modules() if isinstance(m, torch.nn.LeakyReLU)}
    # timm's port: 1e-2 in the stem, 1e-3 in the blocks; the published V2 code: 1e-6 everywhere.
    assert slopes == {1e-2, 1e-3}
    _as_converted(model)
    root = _hub_cache(tmp_path_factory.mktemp("hf") / "hub", HUB_REPO, {
        "model.safetensors": lambda p: save_file(_converted_state(model), str(p))})
    return model, root


def _offline_hub(monkeypatch, root):
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _features_agree(ours, timm_model, side=64):
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        expected = timm_model.forward_features(x)
        got = ours.eval().forward_features(x)
    scale = expected.abs().max().item()
    assert scale > 0.1  # a network that computes something, not zeros
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * scale)


def test_in21k_from_the_hub_cache_computes_timms_network(full_size_hub, monkeypatch):
    from cmal.tresnet.weights import init_lines, load_backbone
    timm_model, root = full_size_hub
    _offline_hub(monkeypatch, root)
    ours = TResnetL_V2({"num_classes": 196, "abn": "pure"})
    record = load_backbone(ours, "in21k", load_head=False)
    _features_agree(ours, timm_model)
    path = next(root.rglob("model.safetensors"))
    assert record["path"] == str(path) and HUB_REPO in record["origin"]
    assert record["bytes"] == path.stat().st_size
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record["key_names"] == "timm" and record["note"] == ""
    assert record["left_out"] == ["head.fc.bias", "head.fc.weight"]
    counters = sum(k.endswith("num_batches_tracked") for k in ours.state_dict())
    assert record["filled"] == counters == 104
    assert record["loaded"] == 746 - 2 - counters
    assert all(int(v) == 0 for k, v in ours.state_dict().items() if k.endswith("tracked"))
    assert init_lines(record) == [
        f"initialised from --weights=in21k: the HuggingFace hub's {HUB_REPO}, file {path} "
        f"({path.stat().st_size / 1e6:.1f} MB, sha256 {record['sha256'][:12]}); timm's key "
        "names, mapped to the published ones",
        f"initialisation: {record['loaded']} tensors loaded; left out: head.fc.bias, "
        "head.fc.weight (the file's classifier; this network's heads start new); 104 "
        "num_batches_tracked counters the file lacks set to 0"]


def test_imagenet21k_without_a_cached_publisher_copy_is_the_hub_copy(full_size_hub, monkeypatch,
                                                                   tmp_path):
    from cmal.tresnet.weights import PUBLISHER_GONE, init_lines, load_backbone
    _, root = full_size_hub
    _offline_hub(monkeypatch, root)
    monkeypatch.setenv("CMAL_CACHE", str(tmp_path / "empty"))
    ours = TResnetL_V2({"num_classes": 10, "abn": "pure"})
    record = load_backbone(ours, "imagenet21k", load_head=False)
    assert record["path"] == str(next(root.rglob("model.safetensors")))
    assert record["note"].startswith("--weights=imagenet21k: ") and PUBLISHER_GONE in record["note"]
    assert "--weights=in21k" in record["note"] and HUB_REPO in record["note"]
    assert init_lines(record)[0] == record["note"]


def _small_timm(num_classes=10):
    torch.manual_seed(1)
    # SMALL's network as timm builds it (v2 rounds the width to a multiple of 8: 16 stays 16).
    return _as_converted(_timm_tresnet(layers=list(SMALL["layers"]),
                                       width_factor=SMALL["width_factor"], num_classes=num_classes))


@pytest.mark.parametrize("wrap", [None, "state_dict", "module"])
def test_pth_in_timms_names(tmp_path, wrap):
    from cmal.tresnet.weights import load_backbone
    timm_model = _small_timm()
    state = _converted_state(timm_model)
    if wrap == "module":
        state = {"module." + k: v for k, v in state.items()}
    path = tmp_path / "timm.pth"
    torch.save(state if wrap != "state_dict" else {"state_dict": state, "epoch": 9}, path)
    ours = _small()
    record = load_backbone(ours, path)
    _features_agree(ours, timm_model)
    # The head fits (same class count) and is loaded: the whole network is timm's.
    torch.testing.assert_close(ours.eval()(torch.ones(1, 3, 64, 64)),
                               timm_model(torch.ones(1, 3, 64, 64)), rtol=1e-5, atol=1e-6)
    assert record["key_names"] == "timm" and record["left_out"] == []


def test_timm_names_map_to_every_published_name():
    from cmal.tresnet.layouts import published_name
    timm_keys = _timm_tresnet(layers=[3, 4, 23, 3], num_classes=10).state_dict().keys()
    ours = TResnetL_V2({"num_classes": 10, "abn": "pure"}).state_dict().keys()
    assert sorted(published_name(k) for k in timm_keys) == sorted(ours)
    assert published_name("body.layer3.0.conv2.conv.weight") == "body.layer3.0.conv2.0.0.weight"
    assert published_name("body.layer3.1.conv2.bn.bias") == "body.layer3.1.conv2.1.bias"
    assert published_name("body.layer2.0.downsample.1.bn.running_var") == \
        "body.layer2.0.downsample.1.1.running_var"


def test_timm_scales_become_abn_weights():
    from cmal.tresnet.layouts import from_timm_names
    state, negative = from_timm_names({"body.conv1.bn.weight": torch.tensor([1e-5, 0.5 + 1e-5]),
                                       "body.conv1.bn.bias": torch.tensor([0.5, -0.5])})
    assert negative == []
    torch.testing.assert_close(state["body.conv1.1.weight"], torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(state["body.conv1.1.bias"], torch.tensor([0.5, -0.5]))


def test_timm_trained_negative_scales_are_refused(tmp_path):
    timm_model = _small_timm()
    with torch.no_grad():
        timm_model.body.layer1[0].conv1.bn.weight[0] = -0.3
    path = tmp_path / "timm_trained.pth"
    torch.save(timm_model.state_dict(), path)
    model = _small()
    same = _unchanged(model)
    with pytest.raises(WeightsError, match=r"negative batch-norm scales \(1 layers, e\.g\. "
                                           r"body\.layer1\.0\.conv1\.1\.weight\)"):
        load_tresnet_weights(model, path)
    assert same()


@pytest.mark.parametrize("prefix", ["", "module."])
def test_safetensors_in_published_names(tmp_path, prefix):
    from safetensors.torch import save_file
    src = _randomise(_small())
    path = tmp_path / "w.safetensors"
    save_file({prefix + k: v for k, v in src.state_dict().items()}, str(path))
    dst = load_tresnet_weights(_small(), path)
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        torch.testing.assert_close(a, b, msg=k)


def test_safetensors_is_recognised_by_its_content(tmp_path):
    from safetensors.torch import save_file
    src = _randomise(_small())
    path = tmp_path / "weights.bin"  # no telling suffix
    save_file(src.state_dict(), str(path))
    dst = load_tresnet_weights(_small(), path)
    assert torch.equal(dst.body.conv1[0].weight, src.body.conv1[0].weight)


def test_truncated_safetensors_is_refused(tmp_path):
    from safetensors.torch import save_file
    path = tmp_path / "w.safetensors"
    save_file(_small().state_dict(), str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=r"w\.safetensors is not a readable safetensors file"):
        load_tresnet_weights(_small(), path)


def test_published_layout_without_counters_loads(tmp_path):
    from cmal.tresnet.weights import load_backbone
    src = _randomise(_small())
    state = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "published.pth"
    torch.save({"model": state}, path)
    dst = _small()
    with torch.no_grad():
        for k, v in dst.state_dict().items():
            if k.endswith("num_batches_tracked"):
                v.fill_(7)
    record = load_backbone(dst, path)
    for k, v in dst.state_dict().items():
        if k.endswith("num_batches_tracked"):
            assert int(v) == 0, k
        else:
            assert torch.equal(v, state[k]), k
    assert record["filled"] == len(src.state_dict()) - len(state) > 0
    assert record["loaded"] == len(state) and record["key_names"] == "published"


def _refused(path, *expected):
    model = _small()
    same = _unchanged(model)
    with pytest.raises(WeightsError) as err:
        load_tresnet_weights(model, path)
    message = str(err.value)
    for text in expected:
        assert text in message, message
    assert same()
    return message


def test_resnet50_is_refused_naming_it(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    _refused(path, "it holds the weights of ResNet-50 (blocks 3,4,6,3",
             "this backbone is a TResNet-V2 variant (blocks 1,1,1,1, stem width 16",
             "--weights takes TResNet-L-V2 weights: in21k")


def test_tresnet_m_is_refused_naming_it(tmp_path):
    import timm
    from safetensors.torch import save_file
    path = tmp_path / "model.safetensors"
    save_file(timm.create_model("tresnet_m", pretrained=False).state_dict(), str(path))
    model = TResnetL_V2({"num_classes": 10, "abn": "pure"})
    same = _unchanged(model)
    with pytest.raises(WeightsError) as err:
        load_tresnet_weights(model, path)
    assert "it holds the weights of TResNet-M (blocks 3,4,11,3, stem width 64; a 1000-class " \
           "head)" in str(err.value)
    assert "this backbone is TResNet-L-V2 (blocks 3,4,23,3" in str(err.value)
    assert same()


def test_a_cmal_checkpoint_is_refused_naming_it(tmp_path):
    from cmal.checkpoint import FORMAT
    from cmal.model import build_cmal
    from tests.conftest import TINY_NET
    path = tmp_path / "last.pt"
    torch.save({"format": FORMAT, "model": build_cmal(3, abn="pure", **TINY_NET).state_dict(),
                "epoch": 2}, path)
    _refused(path, "a whole CMAL-Net", "continue its run with --resume=FILE")


def test_unknown_name_suggests_the_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused("in21", "--weights=in21 is no file and no known name (did you mean in21k?)",
             "in21k, in21k_ft_in1k, stanford_cars, imagenet21k")


def test_hub_offline_without_the_file_names_repo_and_fixes(tmp_path, monkeypatch):
    _offline_hub(monkeypatch, tmp_path / "empty_hub")
    _refused("in21k", f"repository {HUB_REPO} is not in the hub cache {tmp_path / 'empty_hub'}",
             "HF_HUB_OFFLINE is set", "--weights=/path/to/model.safetensors",
             f"hf download {HUB_REPO} model.safetensors")
    monkeypatch.setenv("CMAL_CACHE", str(tmp_path / "no_publisher_copy"))
    _refused("imagenet21k", "--weights=imagenet21k: the publisher's link answers 403 Forbidden "
             "since 2026-05 (Alibaba-MIIL/TResNet issue #57), so its copy on the HuggingFace hub "
             f"was tried: --weights=in21k: model.safetensors of the HuggingFace hub repository "
             f"{HUB_REPO} is not in the hub cache", "HF_HUB_OFFLINE is set")


def _online_hub(monkeypatch, cache, endpoint):
    from huggingface_hub import constants
    from cmal.tresnet import hub
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *hub._PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)


def _closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hub_unreachable_fails_at_once_naming_repo_and_fixes(tmp_path, monkeypatch):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    _online_hub(monkeypatch, tmp_path / "hub", endpoint)
    start = time.monotonic()
    _refused("in21k_ft_in1k", "timm/tresnet_v2_l.miil_in21k_ft_in1k is not in the hub cache",
             f"{endpoint} cannot be reached", "HF_ENDPOINT", "HF_HUB_OFFLINE=1",
             "--weights=/path/to/model.safetensors")
    assert time.monotonic() - start < 5  # not huggingface_hub's five retries


class _Answer(http.server.BaseHTTPRequestHandler):
    """Answers every request with one HTTP status and no body."""
    status = 403

    def do_GET(self):
        self.send_response(self.status)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


@pytest.fixture
def answering(request):
    """An HTTP server on 127.0.0.1 answering every request with `request.param` (a status)."""
    handler = type("Handler", (_Answer,), {"status": request.param})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


@pytest.mark.parametrize("answering", [404], indirect=True)
def test_hub_mirror_without_the_repository(tmp_path, monkeypatch, answering):
    _online_hub(monkeypatch, tmp_path / "hub", answering)
    _refused("in21k", f"{answering} (HF_ENDPOINT) answered HTTP 404",
             "--weights=/path/to/model.safetensors")


@pytest.mark.parametrize("answering", [403], indirect=True)
def test_stanford_cars_403_says_why_and_what_instead(tmp_path, monkeypatch, answering):
    from cmal.tresnet import weights
    url = f"{answering}/model-zoo/tresnet/stanford_cars_tresnet-l-v2_96_27.pth"
    monkeypatch.setitem(weights.PUBLISHED_WEIGHTS, "stanford_cars", url)
    monkeypatch.setenv("CMAL_CACHE", str(tmp_path / "cache"))
    message = _refused("stanford_cars", "--weights=stanford_cars: stanford_cars_tresnet-l-v2_96_27"
                       ".pth is published only by its authors",
                       "403 Forbidden since 2026-05 (Alibaba-MIIL/TResNet issue #57)",
                       "this attempt: HTTP 403 Forbidden", "Use --weights=in21k instead",
                       "--weights=/path/to/stanford_cars_tresnet-l-v2_96_27.pth")
    assert str(tmp_path / "cache" / cache_name(url)) in message


def _cache_publisher_copy(monkeypatch, tmp_path, name, model):
    from cmal.tresnet.weights import PUBLISHED_WEIGHTS
    monkeypatch.setenv("CMAL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cache" / cache_name(PUBLISHED_WEIGHTS[name])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


@pytest.mark.parametrize("name", ["stanford_cars", "imagenet21k"])
def test_a_cached_publisher_copy_is_used_without_network(tmp_path, monkeypatch, name):
    from cmal.tresnet.weights import load_backbone

    def no_network(*args, **kwargs):
        raise AssertionError("the network was used")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    src = _randomise(_small())
    path = _cache_publisher_copy(monkeypatch, tmp_path, name, src)
    dst = _small()
    record = load_backbone(dst, name)
    assert record["path"] == str(path) and record["origin"].endswith(", cached")
    assert record["note"] == ""
    assert torch.equal(dst.body.conv1[0].weight, src.body.conv1[0].weight)


# ---- what initialised a run: its first lines, settings.json and its checkpoints ----

def _run(data, out, *extra):
    from cmal import train
    from tests.conftest import TINY_ARGS
    return train.main({"data_path": str(data), "num_classes": 3, "output_dir": str(out)},
                      TINY_ARGS + ["--epochs=1", "--eval_every=1", *extra])


def _records(out):
    import json
    from cmal import checkpoint as ckpt_io
    saved = json.loads((out / ckpt_io.SETTINGS_FILE).read_text())
    return saved["init"], ckpt_io.load(out / "last.pt")["init"]


def test_a_run_starts_by_saying_what_initialised_it(image_folder, tmp_path, capsys):
    from tests.conftest import TINY_NET
    backbone = _randomise(TResnetL_V2({"num_classes": 7, "abn": "pure",
                                       "layers": TINY_NET["layers"],
                                       "width_factor": TINY_NET["width_factor"]}))
    state = {k: v for k, v in backbone.state_dict().items() if "num_batches" not in k}
    path = tmp_path / "backbone.pth"
    torch.save({"model": state}, path)
    out = tmp_path / "run"
    assert _run(image_folder, out, f"--weights={path}") == 0
    lines = capsys.readouterr().out.splitlines()
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    assert lines[0] == (f"initialised from --weights={path}: a local file "
                        f"({path.stat().st_size / 1e6:.1f} MB, sha256 {sha256[:12]}); the "
                        "published key names")
    counters = len(backbone.state_dict()) - len(state)
    assert lines[1] == (f"initialisation: {len(state) - 2} tensors loaded; left out: "
                        "head.fc.bias, head.fc.weight (the file's classifier; this network's "
                        f"heads start new); {counters} num_batches_tracked counters the file "
                        "lacks set to 0")
    in_settings, in_checkpoint = _records(out)
    assert in_settings == in_checkpoint == {
        "source": str(path), "origin": "a local file", "path": str(path),
        "bytes": path.stat().st_size, "sha256": sha256, "key_names": "published",
        "loaded": len(state) - 2, "left_out": ["head.fc.bias", "head.fc.weight"],
        "filled": counters, "note": ""}


def test_a_random_run_starts_with_a_warning(image_folder, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(image_folder, out) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("WARNING: random initialisation: no --weights, so this run's network "
                            "starts from random weights")
    assert "far below the paper's" in first and "--weights=in21k" in first
    assert _records(out) == ({"source": "random"}, {"source": "random"})


def test_resume_keeps_the_record_and_accepts_checkpoints_without_it(image_folder, tmp_path,
                                                                    capsys):
    from cmal import checkpoint as ckpt_io
    out = tmp_path / "run"
    assert _run(image_folder, out) == 0
    capsys.readouterr()
    assert _run(image_folder, out, "--epochs=2", "--resume", "--extend") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("settings from") and "extended to 2" in lines[0]  # --extend's
    lines = lines[1:]
    assert lines[0].startswith("resumed from") and lines[1].startswith("WARNING: random")
    assert _records(out) == ({"source": "random"}, {"source": "random"})
    # A checkpoint written before runs recorded their initialisation.
    old = ckpt_io.load(out / "last.pt")
    del old["init"]
    ckpt_io.save(old, out / "last.pt")
    assert _run(image_folder, out, "--epochs=3", "--resume", "--extend") == 0
    lines = capsys.readouterr().out.splitlines()[1:]  # after the settings line
    assert lines[1] == ("initialisation: not recorded (the checkpoint was written before runs "
                        "recorded it)")
    assert _records(out) == (None, None)
