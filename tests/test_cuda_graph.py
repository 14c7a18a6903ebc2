"""The graph-replayed iteration and evaluation (cmal/cuda_graph.py) compute engine's functions.

On the CPU a double stands in for torch.cuda.CUDAGraph: capture runs the function and keeps its
output tensors, replay runs it again and writes the new results into them. Everything else is
the code a GPU runs: the static batch, the crop choices and learning rates read from tensors,
fused SGD with tensor rates, the first iteration run eagerly, the warm-up undone. With fused
SGD on both sides the result is the eager iteration's, bit for bit. tests/test_cuda.py runs the
same comparisons with real graphs on a GPU.
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from cmal import engine
from cmal.cuda_graph import GraphedIteration, GraphedScores
from cmal.model import build_cmal
from cmal.optimizer import make_optimizer
from tests.conftest import TINY_NET


class ReplayByCalling:
    """A CUDA graph's contract on any device: replay recomputes what capture returned, in the
    same tensors."""
    captures = 0

    def capture(self, fn):
        ReplayByCalling.captures += 1
        self.fn = fn
        self.outputs = fn()
        return self.outputs

    def replay(self):
        new = tree_leaves(self.fn())
        with torch.no_grad():
            for kept, value in zip(tree_leaves(self.outputs), new):
                kept.copy_(value)

    @staticmethod
    def warmup(fn, iterations):
        for _ in range(iterations):
            fn()


def _net():
    torch.manual_seed(0)
    return build_cmal(4, abn="pure", **TINY_NET)


def _batches(n, size=4):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(size, 3, 64, 64, generator=g), torch.randint(0, 4, (size,), generator=g))
            for _ in range(n)]


def _train(step, batches, sgd="fused", seed=7):
    net = _net()
    optimizer = make_optimizer(net, lr=0.01, backbone_lr=0.005, impl=sgd)
    criterion = nn.CrossEntropyLoss()
    torch.manual_seed(seed)
    results = [step(net, optimizer, x, y, criterion, epoch=i, nb_epoch=5)
               for i, (x, y) in enumerate(batches)]
    return net, optimizer, results


def _same_state(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("ablation", ["none", "no_crops", "no_joint_crop"])
def test_replayed_iterations_equal_eager_ones_bit_for_bit(ablation):
    batches = _batches(5)
    eager_net, eager_opt, eager = _train(
        lambda *a, **k: engine.train_step(*a, **k, ablation=ablation), batches)
    before = ReplayByCalling.captures
    graphed = GraphedIteration(ablation, graph=ReplayByCalling)
    net, optimizer, got = _train(graphed, batches)
    assert ReplayByCalling.captures == before + 1  # captured once, on the second iteration
    for e, g in zip(eager, got):
        assert {k: e[k] for k in engine.LOSS_NAMES} == {k: g[k] for k in engine.LOSS_NAMES}
        assert e["correct"] == g["correct"]
        assert torch.equal(e["logits_concat"], g["logits_concat"])
    _same_state(eager_net, net)
    for p, q in zip(eager_net.parameters(), net.parameters()):
        assert torch.equal(eager_opt.state[p]["momentum_buffer"],
                           optimizer.state[q]["momentum_buffer"])
    # The optimizer is left as the run made it: float rates, its own SGD implementation.
    assert all(isinstance(g["lr"], float) and g["fused"] for g in optimizer.param_groups)
    # The random stream is where the eager iterations leave it.
    assert torch.rand(1).item() == _after_eager(batches, ablation)


def _after_eager(batches, ablation):
    _train(lambda *a, **k: engine.train_step(*a, **k, ablation=ablation), batches)
    return torch.rand(1).item()


def test_foreach_optimizer_is_stepped_fused_inside_the_graph_and_given_back():
    batches = _batches(3)
    eager_net, _, eager = _train(engine.train_step, batches, sgd="foreach")
    net, optimizer, got = _train(GraphedIteration(graph=ReplayByCalling), batches,
                                 sgd="foreach")
    for e, g in zip(eager, got):
        for k in engine.LOSS_NAMES:
            assert g[k] == pytest.approx(e[k], rel=1e-5, abs=1e-7), k
    for p, q in zip(eager_net.parameters(), net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert all(g["foreach"] and not g["fused"] for g in optimizer.param_groups)


def test_a_batch_of_another_shape_runs_eagerly_and_keeps_the_graph():
    batches = _batches(3) + _batches(1, size=3) + _batches(1)
    eager_net, _, eager = _train(engine.train_step, batches)
    before = ReplayByCalling.captures
    net, _, got = _train(GraphedIteration(graph=ReplayByCalling), batches)
    assert ReplayByCalling.captures == before + 1
    assert [e["loss_concat"] for e in eager] == [g["loss_concat"] for g in got]
    _same_state(eager_net, net)


def test_capture_leaves_the_run_where_it_was():
    """The warm-up iterations capture needs are undone: weights, gradients, batch-norm
    statistics and momentum are those of the iterations the run asked for."""
    batches = _batches(2)
    eager_net, _, _ = _train(engine.train_step, batches)
    graphed = GraphedIteration(graph=ReplayByCalling, warmup=4)
    net, _, _ = _train(graphed, batches)
    _same_state(eager_net, net)


def test_replayed_scores_equal_evaluation_logits():
    net = _net().eval()
    scores = GraphedScores(graph=ReplayByCalling)
    for x, _ in _batches(3) + _batches(1, size=3):
        want = engine.evaluation_logits(net, x)
        got = scores(net, x)
        for w, g in zip(tree_leaves(want), tree_leaves(got)):
            assert torch.equal(w, g)
    assert len(scores.graphs) == 2  # one per batch shape


def test_evaluate_with_replayed_scores_reports_the_same():
    net = _net()
    loader = [(x, y, 0) for x, y in _batches(2) + _batches(1, size=3)]
    want = engine.evaluate(net, loader, nn.CrossEntropyLoss(), num_classes=4, flip=True)
    got = engine.evaluate(copy.deepcopy(net), loader, nn.CrossEntropyLoss(), num_classes=4,
                          flip=True, scores=GraphedScores(graph=ReplayByCalling))
    assert want == got


def test_localisation_under_replayed_scores_equals_the_eager_one():
    """With annotated boxes, the graphed scores keep no attention maps: evaluate computes them
    in one more eager pass, and reports what the eager evaluation reports."""
    net = _net()
    g = torch.Generator().manual_seed(3)

    def boxes(size):  # x0, y0, x1, y1 in input pixels; one image of each batch has none
        corner = torch.randint(0, 40, (size, 2), generator=g).float()
        part = torch.cat([corner, corner + 16], 1)
        part[0] = float("nan")
        return part
    loader = [(x, y, 0, boxes(len(x))) for x, y in _batches(2) + _batches(1, size=3)]
    want = engine.evaluate(net, loader, nn.CrossEntropyLoss(), num_classes=4)
    got = engine.evaluate(copy.deepcopy(net), loader, nn.CrossEntropyLoss(), num_classes=4,
                          scores=GraphedScores(graph=ReplayByCalling))
    assert want["localisation"]["images"] == 2 * 3 + 2
    assert want == got


def test_a_network_a_graph_cannot_hold_runs_eagerly_and_says_why(monkeypatch):
    import cmal.cuda_graph
    monkeypatch.setattr(cmal.cuda_graph, "holds_inplace_abn", lambda net: True)
    batches = _batches(3)
    _, _, eager = _train(engine.train_step, batches)
    step = GraphedIteration(graph=ReplayByCalling)
    with pytest.warns(UserWarning, match="InPlaceABN.*--abn=native"):
        _, _, got = _train(step, batches)
    assert step.captured is None
    assert [e["loss_concat"] for e in eager] == [g["loss_concat"] for g in got]


def test_where_cuda_graphs_run():
    from cmal import settings
    from cmal.tresnet import abn_kind_for
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cfg = settings.Settings(data_path="data")
    assert settings.use_cuda_graph(cfg, cuda) and not settings.use_cuda_graph(cfg, cpu)
    for change in ({"cuda_graph": "false"}, {"amp": "fp16"}, {"compile": True}):
        assert not settings.use_cuda_graph(settings.Settings(data_path="d", **change), cuda)
    assert settings.use_cuda_graph(settings.Settings(data_path="d", amp="bf16"), cuda)
    problems = settings.validate(settings.Settings(data_path="d", cuda_graph="true", amp="fp16"))
    assert any("--cuda_graph=true" in p and "--amp=fp16" in p for p in problems)
    # InPlaceABN cannot be captured: where graphs run, --abn=auto builds the native ABN.
    assert abn_kind_for("auto", cuda, cuda_graph=True) == "native"
    assert abn_kind_for("auto", cpu, cuda_graph=True) == "pure"
