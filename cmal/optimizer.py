"""The reference's SGD: its eight parameter groups, their learning rates and schedule, and the
zero-filled gradients the reference's PyTorch kept."""
import torch

from cmal.distributed import unwrap
from cmal.utils import cosine_anneal_schedule

# How SGD updates and zeroes the parameters; the arithmetic is the same. loop: one operation per
# parameter, as the reference; foreach: one per group and operation (the same bits on the CPU,
# about 400 times fewer CUDA kernel launches in zero_grad and step); fused: one kernel per group.
SGD_IMPLS = ("foreach", "fused", "loop")


def make_optimizer(net, lr=0.002, backbone_lr=0.0002, momentum=0.9, weight_decay=5e-4,
                   impl="foreach"):
    """The reference SGD: eight groups, heads at `lr`, the backbone at `backbone_lr` (the
    baseline's two groups: its head at `lr`, its body at `backbone_lr`)."""
    modules = unwrap(net).optimizer_modules()
    optimizer = torch.optim.SGD([{"params": m.parameters()} for m in modules], lr=lr,
                                **_sgd_flags(impl))
    set_hyperparameters(optimizer, lr, backbone_lr, momentum, weight_decay)
    return optimizer


def _sgd_flags(impl):
    if impl not in SGD_IMPLS:
        raise ValueError(f"--sgd must be one of {', '.join(SGD_IMPLS)}, got {impl!r}")
    return {"foreach": impl == "foreach", "fused": impl == "fused"}


def load_optimizer_state(optimizer, state):
    """optimizer.load_state_dict, keeping this run's SGD implementation (the saved groups
    carry the one of the run that wrote them)."""
    flags = [{k: g[k] for k in ("foreach", "fused")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags):
        group.update(kept)


def set_hyperparameters(optimizer, lr, backbone_lr, momentum, weight_decay):
    """Base learning rates (heads, then the backbone group last), momentum and weight decay."""
    for i, group in enumerate(optimizer.param_groups):
        base = backbone_lr if i == len(optimizer.param_groups) - 1 else lr
        group.update(lr=base, base_lr=base, momentum=momentum, weight_decay=weight_decay)


def zero_fill_grads(net):
    """Give every parameter a zero gradient, as it has after any iteration (see train_step).

    A resumed run needs it: a fresh process starts with None gradients, which the optimizer
    would skip, so parameters outside the first pass's loss would miss one decay step.
    """
    for p in net.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)


def set_learning_rates(optimizer, epoch, nb_epoch):
    for group in optimizer.param_groups:
        group["lr"] = cosine_anneal_schedule(epoch, nb_epoch, group["base_lr"])
