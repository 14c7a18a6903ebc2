"""The plain fine-tuning baseline (--method=baseline): the same TResNet-L-V2 with one head.

The network is TResNet-L-V2 exactly as published and as its authors fine-tune it: the body
CMAL-Net's experts read, a global average pool, and one Linear(2048, N) (`head.fc`, weight
N(0, 0.01)). Its state-dict keys are those of the published files, so --weights loads the same
backbone as for CMAL-Net. One iteration is one forward and one backward of that head's cross
entropy, and one step of the reference's SGD with two groups: the head at --lr, the body at
--backbone_lr (momentum, weight decay and the per-epoch cosine schedule as for CMAL-Net).
"""
import torch
import torch.nn as nn

from cmal.engine import LOSS_NAMES, _finite, optimisation_step
from cmal.errors import NonFiniteError
from cmal.optimizer import set_learning_rates
from cmal.tresnet.tresnet_v2 import TResnetL_V2
from cmal.tresnet.weights import RANDOM_INIT, load_backbone


class BaselineNet(nn.Module):
    """TResNet-V2's body, global average pool and linear head; forward returns the logits."""

    method = "baseline"  # its entry in methods.REGISTRY

    def __init__(self, backbone):
        super().__init__()
        self.body = backbone.body
        self.global_pool = backbone.global_pool
        self.head = backbone.head

    def forward(self, x):
        return self.head(self.global_pool(self.body(x)))

    @torch.no_grad()
    def evaluation_logits(self, inputs, with_maps=False):
        """The one head's logits stand for concat, com2 and combined alike; no experts (and
        with `with_maps`, no attention maps: None)."""
        logits = self(inputs).float()
        return (logits, logits, logits, ()) + ((None,) if with_maps else ())

    def optimizer_modules(self):
        """The SGD's groups, the backbone last (optimizer.set_hyperparameters): head, body."""
        return [self.head, self.body]


def build_baseline(num_classes, weights=None, **backbone_options):
    """The baseline on TResNet-L-V2 (or a smaller TResNet-V2 via `layers` / `width_factor`);
    `weights`: TResNet-L-V2 weights for the body (their head is not used); the network's
    `init_record` says what initialised it, as CMAL-Net's (model.build_cmal)."""
    backbone = TResnetL_V2({"num_classes": num_classes, **backbone_options})
    # A new classifier, as CMAL-Net's heads are new: a published head of the same class count
    # (the Stanford Cars file) was trained on those very classes.
    record = load_backbone(backbone, weights, load_head=False) if weights else dict(RANDOM_INIT)
    net = BaselineNet(backbone)
    net.init_record = record
    return net


def build(cfg, abn, weights=None):
    """The baseline as a run's settings describe it, with this ABN kind (methods.Method.build)."""
    return build_baseline(cfg.num_classes, weights=weights, layers=cfg.layers,
                          width_factor=cfg.width_factor, abn=abn)


def iteration(cfg, cuda_graph=False):
    """One forward and backward per batch; its one pass stays eager under CUDA graphs."""
    return baseline_train_step


def baseline_train_step(net, optimizer, inputs, targets, criterion, epoch=None, nb_epoch=None,
                        precision=None):
    """One baseline iteration: one forward, the head's cross entropy, one backward and step.

    Returns train_step's keys: the loss as loss_concat (the loss that the training accuracy's
    head is trained with, as in CMAL-Net's step 6, here not doubled), the other four losses 0,
    so that train_loss (the reference's loss1 + loss2 + loss3 + loss_concat) is the baseline's
    loss; the head's logits as logits_concat.
    """
    if epoch is not None:
        set_learning_rates(optimizer, epoch, nb_epoch)
    logits, loss = optimisation_step(net, optimizer, inputs,
                                     lambda out: criterion(out.float(), targets), precision)
    logits = logits.detach()
    # One host synchronisation per iteration, as train_step.
    value, correct = torch.stack([loss.float(),
                                  (logits.argmax(1) == targets).sum().float()]).tolist()
    if not _finite(value):
        raise NonFiniteError(f"loss={value:.4g}")
    return {**dict.fromkeys(LOSS_NAMES, 0.0), "loss_concat": value, "correct": int(correct),
            "logits_concat": logits}
