"""What only a GPU can check: the ABNs' CUDA kernels against each other, the fast path and the
compiled network against fp32 eager, checkpoints moving between CUDA and the CPU, reproducible
CUDA runs, and torchrun with NCCL. Every test here skips, with the reason, where no GPU is
visible; `make test` runs them on a GPU machine with the same command."""
import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cmal import checkpoint as ckpt_io
from cmal import train
from cmal.cuda_graph import GraphedIteration, GraphedScores
from cmal.engine import train_step
from cmal.model import compile_network
from cmal.optimizer import make_optimizer
from cmal.model import build_cmal
from cmal.precision import Precision
from cmal.tresnet import inplace_abn_available
from tests.conftest import TINY_ARGS, TINY_NET, make_image_folder

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU is visible")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                    reason="DDP over NCCL needs two GPUs")
needs_inplace_abn = pytest.mark.skipif(not inplace_abn_available(),
                                       reason="inplace_abn is not installed (make setup builds it)")
GPU_ARGS = [a for a in TINY_ARGS if not a.startswith("--device")]
TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def _exact_float32():
    """TF32 would round every fp32 convolution and matmul to 10 bits of mantissa."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _net(abn, num_classes=4):
    torch.manual_seed(0)
    return build_cmal(num_classes, abn=abn, **TINY_NET).cuda()


def _batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(4, 3, 64, 64, generator=g).cuda(), torch.arange(4).cuda()


def _steps(net, impl="loop", amp_dtype=None, iterations=2, runner=None, step=train_step):
    optimizer = make_optimizer(net, lr=0.01, backbone_lr=0.01, impl=impl)
    x, y = _batch()
    criterion = nn.CrossEntropyLoss()
    precision = Precision.of_dtype(amp_dtype, "cuda")
    losses = []
    for seed in range(iterations):
        torch.manual_seed(seed)
        losses.append(step(runner or net, optimizer, x, y, criterion, precision=precision))
    return losses


@needs_inplace_abn
@pytest.mark.parametrize("kind", ["pure", "native"])
def test_abns_agree_with_inplace_abn_on_cuda(kind):
    reference, other = _net("inplace"), _net(kind)
    other.load_state_dict(reference.state_dict())
    with torch.no_grad():  # non-trivial scales, negatives included
        for (name, p), q in zip(reference.named_parameters(), other.parameters()):
            if p.dim() == 1 and "Features" in name:
                p.copy_(torch.randn_like(p) * 0.5 + 0.5)
                q.copy_(p)
    x, _ = _batch()
    for training in (True, False):
        reference.train(training), other.train(training)
        a, b = reference(x), other(x)
        for i in range(4):
            torch.testing.assert_close(a[i], b[i], rtol=1e-3, atol=1e-4)
        sum(o.sum() for o in a[:4]).backward(), sum(o.sum() for o in b[:4]).backward()
        grads = dict(reference.named_parameters())
        for name, p in other.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-2, atol=1e-3, msg=name)
        reference.zero_grad(), other.zero_grad()
    for (name, a), b in zip(reference.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@needs_inplace_abn
def test_inplace_abn_runs_on_this_gpu():
    """make setup builds inplace-abn for the visible GPU: the start-of-run probe finds it fits."""
    from cmal.tresnet.abn import abn_kind_for, inplace_abn_gpu_problem
    assert inplace_abn_gpu_problem(torch.device("cuda")) is None
    assert abn_kind_for("auto", "cuda") == "inplace"


def test_fast_path_learns_as_fp32_on_a_fixed_batch():
    from tests.test_fast_path import check_bf16_learns_as_fp32
    check_bf16_learns_as_fp32("cuda")


# Losses of one iteration from the same state: fp32 differs only by the summation order of
# cuDNN's non-deterministic backward (about 1e-6 relative) and by fused-kernel roundings; bf16 by
# its 2^-8 roundings of those differences, through five passes.
SAME_STATE_REL = {None: 1e-3, torch.bfloat16: 2e-2}


def _from_the_same_states(make_runner, step, amp_dtype, iterations=4):
    """(eager result, other result) of each iteration, both from the state the other run
    reached. Over several iterations the crops turn any rounding into other boxes (chaos), so
    each iteration is compared from a shared state rather than two whole trajectories."""
    from cmal.cuda_graph import _state_tensors
    eager_net = _net("native")
    other_net = copy.deepcopy(eager_net)
    runner = make_runner(other_net)
    x, y = _batch()
    criterion = nn.CrossEntropyLoss()
    eager_opt, other_opt = (make_optimizer(n, lr=0.01, backbone_lr=0.01, impl="fused")
                            for n in (eager_net, other_net))
    precision = Precision.of_dtype(amp_dtype, "cuda")
    pairs = []
    for seed in range(iterations):
        torch.manual_seed(seed)
        expected = train_step(eager_net, eager_opt, x, y, criterion, precision=precision)
        torch.manual_seed(seed)
        got = step(runner, other_opt, x, y, criterion, precision=precision)
        pairs.append((expected, got))
        with torch.no_grad():
            for e, o in zip(_state_tensors(eager_net, eager_opt),
                            _state_tensors(other_net, other_opt)):
                e.copy_(o)
    return pairs


def _check_pairs(pairs, amp_dtype):
    for i, (e, g) in enumerate(pairs):
        for k in ("loss1", "loss2", "loss3", "loss_att", "loss_concat"):
            assert g[k] == pytest.approx(e[k], rel=SAME_STATE_REL[amp_dtype]), (i, k)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_compiled_iteration_equals_eager(amp_dtype):
    _check_pairs(_from_the_same_states(compile_network, train_step, amp_dtype), amp_dtype)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_graph_replayed_iteration_equals_eager(amp_dtype):
    """The whole iteration captured as one CUDA graph (cmal/cuda_graph.py) and replayed: the
    same losses as the eager iteration with the same (fused) SGD; the same kernels run."""
    step = GraphedIteration()
    pairs = _from_the_same_states(lambda net: net, step, amp_dtype)
    assert step.failed is None and step.captured is not None
    _check_pairs(pairs, amp_dtype)


@needs_inplace_abn
def test_inplace_abn_network_runs_eagerly_and_says_why():
    """InPlaceABN cannot be captured (seen on an H200); the iteration runs eagerly, says so
    once, and leaves CUDA usable (a failed capture would break its random generator)."""
    eager_net = _net("inplace")
    graphed_net = copy.deepcopy(eager_net)
    expected = _steps(eager_net, "fused", iterations=3)
    step = GraphedIteration()
    with pytest.warns(UserWarning, match="InPlaceABN"):
        got = _steps(graphed_net, "fused", iterations=3, step=step)
    assert step.captured is None and "--abn=native" in step.failed
    for e, g in zip(expected, got):
        assert g["loss3"] == pytest.approx(e["loss3"], rel=1e-3)
    torch.randn(4, device="cuda")


def test_graph_replayed_scores_equal_evaluation_logits():
    from cmal.engine import evaluation_logits
    net = _net("native").eval()
    scores = GraphedScores()
    for size in (4, 4, 3):
        x = torch.randn(size, 3, 64, 64, device="cuda")
        want, got = evaluation_logits(net, x), scores(net, x)
        assert scores.failed is None
        for w, g in zip(want[:3], got[:3]):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def _run(data, out, *extra):
    return train.main({"data_path": str(data), "num_classes": 3, "output_dir": str(out)},
                      GPU_ARGS + list(extra))


@pytest.mark.parametrize("first, second", [("cuda", "cpu"), ("cpu", "cuda")])
def test_checkpoint_moves_between_cuda_and_cpu(image_folder, tmp_path, first, second):
    out = tmp_path / "run"
    assert _run(image_folder, out, "--epochs=1", f"--device={first}") == 0
    assert _run(image_folder, out, "--epochs=2", "--extend", "--resume",
                f"--device={second}") == 0
    ck = ckpt_io.load(out / "last.pt")
    assert ck["epoch"] == 2
    assert all(t.device.type == "cpu" for t in ck["model"].values())
    assert _run(image_folder, out, "--test_only", f"--resume={out / 'last.pt'}",
                f"--device={first}") == 0


def test_deterministic_cuda_runs_are_identical(image_folder, tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        assert _run(image_folder, out, "--epochs=2", "--device=cuda", "--deterministic") == 0
    a, b = (ckpt_io.load(out / "last.pt")["model"] for out in runs)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _torchrun(nproc, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", str(TESTS / "ddp_probe.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_more_ranks_than_gpus_stops_with_what_to_do(tmp_path):
    data = make_image_folder(tmp_path / "data")
    count = torch.cuda.device_count()
    proc = _torchrun(count + 1, f"--data_path={data}", f"--output_dir={tmp_path / 'run'}",
                     "--epochs=1", "--num_classes=3", "--device=cuda", *GPU_ARGS)
    assert proc.returncode != 0
    assert f"use --nproc_per_node={count}" in proc.stderr, proc.stderr[-2000:]


@needs_two_gpus
def test_ddp_over_nccl_keeps_the_ranks_identical(tmp_path):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    proc = _torchrun(2, f"--data_path={data}", f"--output_dir={out}", "--epochs=2",
                     "--num_classes=3", "--eval_every=1", "--device=cuda", "--deterministic",
                     *GPU_ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "x 2 processes" in proc.stdout
    a, b = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k
