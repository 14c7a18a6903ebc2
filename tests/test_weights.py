import http.server
import os
import socket
import threading

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
