"""The CMAL-Net iteration and evaluation replayed as CUDA graphs (--cuda_graph).

One iteration launches about 30,000 CUDA kernels (five forward and backward passes, five
optimizer steps, the attention crops); at batch 16 the GPU finishes each long before Python
launches the next (../shared/gpu/H100_PROFILE.md). Captured once as a graph, the whole iteration
is one launch. What changes between iterations lives in tensors the graph reads: the batch, the
two crop choices (drawn on the host from torch.rand(1) as the reference draws them) and the
groups' learning rates.

Exactly the function of engine.train_step: the first iteration of a fresh run (when some
parameters have no gradient yet, so SGD skips them, as the reference) and batches of another
shape run eagerly; capture's warm-up iterations are undone.
"""
import warnings

import torch

from cmal import engine
from cmal.optimizer import set_learning_rates
from cmal.tresnet.abn import holds_inplace_abn

WARMUP = 3  # eager iterations before capture (cuDNN, cuBLAS and autograd set themselves up)


class CudaGraph:
    """torch.cuda.CUDAGraph; tests stand in a replay-by-calling double on the CPU."""

    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn):
        # thread_local: the DataLoader's pin-memory thread may call CUDA during the capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            return fn()

    def replay(self):
        self.graph.replay()

    @staticmethod
    def warmup(fn, iterations):
        """`fn` run eagerly on a side stream, as capture requires."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(iterations):
                fn()
        torch.cuda.current_stream().wait_stream(stream)


def _selected(choice):
    """choose() for iteration_tensors: the candidate numbered by the device tensor choice[k]."""
    def choose(k, a, b, c):
        return torch.where(choice[k] == 0, a, torch.where(choice[k] == 1, b, c))
    return choose


def _state_tensors(net, optimizer):
    """Every tensor an iteration changes: parameters, gradients, buffers, momentum."""
    tensors = [p.data for p in net.parameters()] + [p.grad for p in net.parameters()]
    tensors += list(net.buffers())
    tensors += [s["momentum_buffer"] for s in optimizer.state.values()
                if s.get("momentum_buffer") is not None]
    return tensors


class GraphedIteration:
    """engine.train_step (with train_step's signature) as one CUDA graph per batch shape.

    The optimizer steps inside the graph with fused SGD reading each group's learning rate from
    a device tensor (the same update as foreach and loop SGD); its param_groups keep their plain
    float rates for the schedule and checkpoints.
    """

    def __init__(self, ablation="none", graph=CudaGraph, warmup=WARMUP):
        engine.check_ablation(ablation)
        self.ablation, self.new_graph, self.warmup = ablation, graph, warmup
        self.captured = None  # (key, graph, static tensors) of the captured iteration
        self.failed = None  # why capture failed: every iteration then runs eagerly

    def __call__(self, net, optimizer, inputs, targets, criterion, epoch=None, nb_epoch=None,
                 precision=None):
        if epoch is not None:
            set_learning_rates(optimizer, epoch, nb_epoch)
        key = (net, optimizer, criterion, tuple(inputs.shape), inputs.stride(), inputs.dtype,
               None if precision is None else precision.dtype)
        if self.failed is None and holds_inplace_abn(net):
            self.failed = _give_up(INPLACE_ABN)
        if engine._scaler(precision) is not None or self.failed or \
                not self._ready(net, optimizer):
            return engine.train_step(net, optimizer, inputs, targets, criterion,
                                     precision=precision, ablation=self.ablation)
        choices = [engine.draw_choice(), engine.draw_choice()]
        if self.captured is None or self.captured[0] != key:
            if self.captured is not None and self.captured[0][3] != key[3]:
                # Another batch shape (a last, smaller batch): eager, the graph kept.
                return self._eager(net, optimizer, inputs, targets, criterion, precision, choices)
            try:
                self.captured = (key, *self._capture(net, optimizer, inputs, targets, criterion,
                                                     precision))
            except RuntimeError as exc:  # an operation a graph cannot hold (a host sync)
                self.failed = _give_up(exc)
                return self._eager(net, optimizer, inputs, targets, criterion, precision, choices)
        _, graph, static = self.captured
        static["x"].copy_(inputs)
        static["y"].copy_(targets)
        for k, c in enumerate(choices):  # fill_, not a copy from the host: no synchronisation
            static["choice"][k].fill_(c)
        for rate, group in zip(static["lr"], optimizer.param_groups):
            rate.fill_(group["lr"])
        graph.replay()
        return engine.step_result(static["values"], static["logits"].clone())

    @staticmethod
    def _ready(net, optimizer):
        """Whether every parameter has a gradient and a momentum buffer, as after any
        iteration: until then SGD skips some parameters, which a graph cannot."""
        return all(p.grad is not None and optimizer.state.get(p, {}).get("momentum_buffer")
                   is not None for p in net.parameters())

    def _eager(self, net, optimizer, inputs, targets, criterion, precision, choices):
        choice = torch.tensor(choices, device=inputs.device)
        return engine.step_result(*engine.iteration_tensors(
            net, optimizer, inputs, targets, criterion, _selected(choice), precision,
            ablation=self.ablation))

    def _capture(self, net, optimizer, inputs, targets, criterion, precision):
        """Capture the iteration on static copies of the batch; the warm-up iterations that
        capture needs are undone, so the run's state is as before."""
        device = inputs.device
        static = {"x": inputs.clone(), "y": targets.clone(),
                  "choice": torch.zeros(2, dtype=torch.long, device=device),
                  # The CUDA kernel of fused SGD reads a float32 rate; the CPU's, any.
                  "lr": [torch.tensor(float(g["lr"]), device=device, dtype=torch.float32
                                      if device.type == "cuda" else torch.float64)
                         for g in optimizer.param_groups]}
        saved_groups = [{k: g[k] for k in ("lr", "fused", "foreach")}
                        for g in optimizer.param_groups]
        state = _state_tensors(net, optimizer)
        kept = [t.to("cpu", copy=True) for t in state]

        def iteration():
            return engine.iteration_tensors(
                net, optimizer, static["x"], static["y"], criterion,
                _selected(static["choice"]), precision, ablation=self.ablation,
                autocast_cache=False)
        try:
            for group, rate in zip(optimizer.param_groups, static["lr"]):
                group.update(lr=rate, fused=True, foreach=False)
            graph = self.new_graph()
            graph.warmup(iteration, self.warmup)
            static["values"], static["logits"] = graph.capture(iteration)
        finally:
            for group, saved in zip(optimizer.param_groups, saved_groups):
                group.update(saved)
            with torch.no_grad():
                for t, k in zip(state, kept):
                    t.copy_(k)
        return graph, static


# Seen on an H200 (torch 2.11, inplace-abn 1.1.0): capturing InPlaceABN's training kernels fails,
# and a failed capture leaves the CUDA random generator unusable in that process.
INPLACE_ABN = "the network has InPlaceABN layers, which a CUDA graph cannot hold; --abn=native " \
    "or --abn=auto computes the same function in PyTorch operations"


def _give_up(exc):
    why = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    warnings.warn(f"CUDA graph capture failed ({why}); running eagerly instead (the same "
                  "function, slower). --cuda_graph=false skips the attempt.", stacklevel=3)
    return why


class GraphedScores:
    """engine.evaluation_logits as a CUDA graph per batch shape (evaluate's `scores`): the two
    forward passes and the joint crop of a test batch in one launch. The graphs read the
    network's weights as they are at each call."""

    def __init__(self, precision=None, graph=CudaGraph, warmup=2):
        self.precision, self.new_graph, self.warmup = precision, graph, warmup
        self.graphs = {}
        self.failed = None

    def __call__(self, model, inputs):
        key = (model, tuple(inputs.shape), inputs.stride(), inputs.dtype)
        if self.failed is None and holds_inplace_abn(model):
            self.failed = _give_up(INPLACE_ABN)
        if self.failed:
            with engine._autocast(self.precision):
                return engine.evaluation_logits(model, inputs)
        if key not in self.graphs:
            static_x = inputs.clone()

            def scores():
                with engine._autocast(self.precision, cache=False):
                    return engine.evaluation_logits(model, static_x)
            graph = self.new_graph()
            try:
                graph.warmup(scores, self.warmup)
                self.graphs[key] = (graph, static_x, graph.capture(scores))
            except RuntimeError as exc:
                self.failed = _give_up(exc)
                return self(model, inputs)
        graph, static_x, outputs = self.graphs[key]
        static_x.copy_(inputs)
        graph.replay()
        concat, com2, com, experts = outputs
        # The next replay overwrites these.
        return concat.clone(), com2.clone(), com.clone(), tuple(e.clone() for e in experts)
