"""Training and evaluation of CMAL-Net: one iteration, one epoch, one evaluation pass.

Every entry point (the three dataset scripts, train.py, the demo, the benchmark) calls these.
"""

import contextlib

import torch
from tqdm import tqdm

from cmal import distributed, localisation
from cmal.distributed import unwrap
from cmal.errors import NON_FINITE_FIXES, NonFiniteError  # noqa: F401 (engine's API)
from cmal.methods import ABLATIONS
from cmal.optimizer import set_learning_rates
from cmal.scores import attention_maps
from cmal.utils import attention_im, highlight_im

LOSS_NAMES = ("loss1", "loss2", "loss3", "loss_att", "loss_concat")


def _autocast(precision, cache=True):
    """The forward's context under `precision` (a precision.Precision; None: float32)."""
    return contextlib.nullcontext() if precision is None else precision.autocast(cache)


def _scaler(precision):
    """The gradient scaler of `precision` (fp16's), or None."""
    return None if precision is None else precision.scaler


def optimisation_step(net, optimizer, x, pick_loss, precision=None, autocast_cache=True):
    """One forward of `net` on `x`, the loss `pick_loss(output)`, its backward and one optimizer
    step; returns (output, the loss detached). `precision`: autocast and the gradient scaler
    (precision.Precision; None: float32)."""
    # Gradients are zeroed, not freed: the reference's PyTorch kept zero-filled gradients, so
    # momentum and weight decay move every parameter at each optimizer step.
    optimizer.zero_grad(set_to_none=False)
    with _autocast(precision, autocast_cache):
        out = net(x)
        loss = pick_loss(out)
    scaler = _scaler(precision)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return out, loss.detach()


def draw_choice():
    """Which input a step on a crop trains on, drawn as the reference draws it (torch.rand(1) on
    the CPU's generator): 0, 1 or 2 for its first, second or third candidate."""
    flag = torch.rand(1)
    return 0 if flag < 1 / 3 else 1 if flag < 2 / 3 else 2


def _drawn(_, *candidates):
    return candidates[draw_choice()]


def train_step(net, optimizer, inputs, targets, criterion, epoch=None, nb_epoch=None,
               precision=None, ablation="none"):
    """One CMAL-Net iteration (spec section 4): five forward passes and five optimizer steps.

    e3 on the raw batch; attention crops from that pass; e2 and e1 on a crop or the raw batch
    chosen by torch.rand(1); all heads on the joint crop; the concatenation on the raw batch.
    With `epoch` and `nb_epoch` the group learning rates are first set by the cosine schedule.
    `ablation`: one of ABLATIONS.
    """
    check_ablation(ablation)
    if epoch is not None:
        set_learning_rates(optimizer, epoch, nb_epoch)
    return step_result(*iteration_tensors(net, optimizer, inputs, targets, criterion, _drawn,
                                          precision, ablation))


def check_ablation(ablation):
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")


def iteration_tensors(net, optimizer, inputs, targets, criterion, choose, precision=None,
                      ablation="none", autocast_cache=True):
    """train_step's five steps, on the device and without a host synchronisation (what a CUDA
    graph captures): returns (loss1, loss2, loss3, loss_att, loss_concat and the number of
    correct concatenation predictions as one float tensor, the concatenation logits).

    `choose(k, crop_a, crop_b, raw)` picks the input of step k (0: expert 2's, 1: expert 1's).
    """
    def optimise(pick_loss, x):
        return optimisation_step(net, optimizer, x, pick_loss, precision, autocast_cache)

    def ce(logits):
        return criterion(logits.float(), targets)

    out, loss3 = optimise(lambda o: ce(o.logits3), inputs)
    if ablation == "no_crops":
        inputs3_att = inputs2_att = inputs1_att = inputs_att = inputs
    else:
        with torch.no_grad():
            a1, a2, a3 = attention_maps(net, out)
            inputs3_att = attention_im(inputs, a3)
            inputs2_att = attention_im(inputs, a2)
            inputs1_att = attention_im(inputs, a1)
            inputs_att = None if ablation == "no_joint_crop" else highlight_im(inputs, a1, a2, a3)
    del out

    _, loss2 = optimise(lambda o: ce(o.logits2), choose(0, inputs3_att, inputs1_att, inputs))
    _, loss1 = optimise(lambda o: ce(o.logits1), choose(1, inputs3_att, inputs2_att, inputs))
    if inputs_att is None:
        loss_att = loss3.new_zeros(())
    else:
        _, loss_att = optimise(lambda o: ce(o.logits1) + ce(o.logits2) + ce(o.logits3)
                               + ce(o.logits_concat) * 2, inputs_att)
    out, loss_concat = optimise(lambda o: ce(o.logits_concat) * 2, inputs)

    logits = out.logits_concat.detach()
    correct = (logits.argmax(1) == targets).sum()
    return torch.stack([loss1, loss2, loss3, loss_att, loss_concat,
                        correct.float()]).float(), logits


def step_result(values, logits_concat):
    """train_step's result from iteration_tensors' two tensors; raises NonFiniteError."""
    # One host synchronisation per iteration, for every number the loop reports.
    *values, correct = values.tolist()
    result = dict(zip(LOSS_NAMES, values))
    if not all(map(_finite, values)):
        raise NonFiniteError(", ".join(f"{k}={v:.4g}" for k, v in result.items()))
    result["correct"] = int(correct)
    result["logits_concat"] = logits_concat
    return result


def _finite(v):
    return v == v and abs(v) != float("inf")


def new_epoch_stats():
    """Running sums of an epoch; `position` counts the loader's batches consumed so far."""
    return {"position": 0, "batches": 0, "correct": 0, "total": 0, "skipped": 0,
            **{k: 0.0 for k in LOSS_NAMES}}


def train_one_epoch(net, optimizer, loader, criterion, device, epoch, nb_epoch, stats=None,
                    precision=None, channels_last=False, after_batch=None, progress=True,
                    iteration=None):
    """Train for the rest of one epoch; return (stats, finished).

    `iteration`: what one batch runs, with train_step's signature (train_step with an ablation,
    or the baseline's); by default train_step.

    `stats` carries the running sums when an epoch is resumed midway. `after_batch(stats)` is
    called after every iteration; when it returns True the epoch stops early (finished=False).
    """
    iteration = iteration or train_step
    net.train()
    stats = stats or new_epoch_stats()
    bar = tqdm(loader, desc=f"epoch {epoch + 1} train", leave=False, dynamic_ncols=True,
               disable=not progress)
    for inputs, targets, skipped in bar:
        stats["position"] += 1
        stats["skipped"] += skipped
        # BatchNorm1d needs two samples (fewer remain when bad files were skipped); under DDP
        # every process must skip the same iterations, or their collectives would mismatch.
        too_small = inputs.shape[0] < 2
        if distributed.is_distributed():
            too_small = distributed.all_reduce_sum([float(too_small)])[0] > 0
        if too_small:
            if after_batch is not None and after_batch(stats):
                return stats, False
            continue
        inputs = inputs.to(device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        try:
            step = iteration(net, optimizer, inputs, targets, criterion, epoch, nb_epoch,
                             precision=precision)
        except NonFiniteError as exc:
            fp16 = " Prefer --amp=bf16 to fp16." if _scaler(precision) else ""
            raise NonFiniteError(
                f"non-finite training loss at epoch {epoch + 1}, batch {stats['position']} "
                f"({exc}). The run is stopped and no checkpoint was written from this state. "
                f"{NON_FINITE_FIXES}" + fp16) from None
        stats["batches"] += 1
        stats["total"] += targets.shape[0]
        stats["correct"] += step["correct"]
        for k in LOSS_NAMES:
            stats[k] += step[k]
        bar.set_postfix(acc=f"{100.0 * stats['correct'] / stats['total']:.1f}",
                        loss=f"{step['loss_concat']:.3f}")
        if after_batch is not None and after_batch(stats):
            return stats, False
    return stats, True


def reduce_stats(stats):
    """The epoch's running sums added over processes (the position is the same on all)."""
    keys = [k for k in stats if k != "position"]
    return {"position": stats["position"], **dict(zip(keys, distributed.all_reduce_sum(
        [stats[k] for k in keys])))}


def summarise_train(stats):
    """Epoch averages over all processes: accuracy in percent, losses per batch."""
    totals = reduce_stats(stats)
    n = max(totals["batches"], 1)
    return {"train_acc": 100.0 * totals["correct"] / max(totals["total"], 1),
            "train_loss": (totals["loss1"] + totals["loss2"] + totals["loss3"]
                           + totals["loss_concat"]) / n,
            **{k: totals[k] / n for k in LOSS_NAMES},
            "samples": int(totals["total"]), "skipped": int(totals["skipped"])}


@torch.no_grad()
def evaluation_logits(model, inputs, with_maps=False):
    """(concat, com2, combined, experts) logits of a batch in float32, as evaluate scores them:
    the network's own `evaluation_logits` (CMAL-Net's combined scores; the baseline's one head
    stands for all three and has no experts). `with_maps`: a fifth item, the experts' attention
    maps (the baseline's: None)."""
    return unwrap(model).evaluation_logits(inputs, with_maps)


def ranking_logits(model, inputs):
    """The logits evaluation ranks by (its "combined" accuracy): CMAL-Net's combined score, the
    baseline's one head."""
    return evaluation_logits(model, inputs)[2]


@torch.no_grad()
def evaluate(net, loader, criterion, device=None, precision=None, channels_last=False,
             progress=False, should_stop=None, num_classes=None, flip=False, scores=None):
    """Spec section 5: the raw pass, the joint attention crop pass, and the accuracies.

    Returns acc_concat (the concatenation head alone), acc_com2 (the four raw logits summed),
    acc_combined (those plus the four crop logits: the headline number), acc_expert1, 2, 3 (each
    expert's raw-pass logits alone), in percent, and loss (cross entropy of the concatenation
    head, averaged over samples). Returns None when `should_stop()` (checked per batch, in this
    process only) asked to stop on any process. The baseline (one head) has no experts: its
    head's accuracy is acc_concat, acc_com2 and acc_combined alike, its loss that head's.

    Beyond the paper's protocol: with `num_classes`, also the top-5 accuracy of the combined
    score and its confusion matrix (rows: true class, columns: predicted); with `flip`, the
    combined accuracy of the image and its mirror image scored together (acc_combined_flip).
    `precision`: autocast's (precision.Precision; None: float32). `scores(model, inputs)`: what
    computes evaluation_logits under it (cuda_graph.GraphedScores);
    by default evaluation_logits itself.

    Where the loader yields annotated boxes (a fourth item per batch: the dataset has a
    boxes.csv), CMAL-Net's result also holds "localisation": how its crop boxes match them
    (cmal/localisation.py).
    """
    model = unwrap(net)  # no DDP wrapper: ranks may hold different numbers of test batches
    model.eval()
    device = device or next(model.parameters()).device
    # correct: concat, com2, combined; loss sum; samples; correct: top-5, flipped, experts 1-3
    sums = torch.zeros(10, dtype=torch.float64, device=device)
    confusion = torch.zeros((num_classes or 0) ** 2, dtype=torch.float64, device=device)
    # Attention localisation, where the loader yields annotated boxes (cmal/localisation.py).
    located = torch.zeros(localisation.NUM_SUMS, dtype=torch.float64, device=device)
    chance = localisation.chance_generator()
    stopped = False

    def score(inputs, with_maps=False):
        if scores is not None:
            logits = scores(model, inputs)
            if not with_maps:
                return logits
            # The graphed scores keep no maps: one more eager raw pass computes them.
            with _autocast(precision):
                maps = attention_maps(model, model(inputs)) if hasattr(model, "experts") else None
            return (*logits, maps)
        with _autocast(precision):
            return evaluation_logits(model, inputs, with_maps)
    for inputs, targets, _, *part in tqdm(loader, desc="test", leave=False, dynamic_ncols=True,
                                          disable=not progress):
        if should_stop is not None and should_stop():
            stopped = True
            break
        if inputs.shape[0] == 0:  # every image of the batch was skipped as unreadable
            continue
        inputs = inputs.to(device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        targets = targets.to(device, non_blocking=True)
        concat, com2, com, experts, *maps = score(inputs, with_maps=bool(part))
        if maps and maps[0] is not None:
            located += localisation.batch_sums(maps[0], part[0], inputs.shape[2:], chance)
        loss = criterion(concat, targets) * len(targets)
        predicted = com.argmax(1)
        top5 = flipped = sums.new_tensor(0.0)
        if num_classes:
            confusion += torch.bincount(targets * num_classes + predicted,
                                        minlength=num_classes ** 2).double()
            best5 = com.topk(min(5, num_classes), 1).indices
            top5 = (best5 == targets[:, None]).any(1).sum().double()
        if flip:
            mirrored = score(inputs.flip(3))[2]
            flipped = ((com + mirrored).argmax(1) == targets).sum().double()
        experts_correct = [(e.argmax(1) == targets).sum().double() for e in experts] or \
            [sums.new_tensor(0.0)] * 3
        sums += torch.stack([(concat.argmax(1) == targets).sum().double(),
                             (com2.argmax(1) == targets).sum().double(),
                             (predicted == targets).sum().double(),
                             loss.double(), sums.new_tensor(len(targets)), top5, flipped,
                             *experts_correct])
    # Ranks hold different numbers of test batches: agree on stopping only after the loop.
    *totals, stopped = distributed.all_reduce_sum(sums.tolist() + confusion.tolist()
                                                  + located.tolist() + [float(stopped)])
    if stopped:
        return None
    totals, located = totals[:-localisation.NUM_SUMS], totals[-localisation.NUM_SUMS:]
    correct_concat, correct_com2, correct_com, loss_sum, n, top5, flipped = totals[:7]
    n = max(n, 1)
    result = {"acc_concat": 100.0 * correct_concat / n, "acc_com2": 100.0 * correct_com2 / n,
              "acc_combined": 100.0 * correct_com / n, "loss": loss_sum / n, "samples": int(n)}
    if hasattr(model, "experts"):  # the baseline's one head has no experts
        result.update({f"acc_expert{i}": 100.0 * c / n for i, c in enumerate(totals[7:10], 1)})
    if num_classes:
        counts = torch.tensor(totals[10:]).view(num_classes, num_classes)
        result["acc_top5_combined"] = 100.0 * top5 / n
        result["confusion"] = counts.long().tolist()
    if flip:
        result["acc_combined_flip"] = 100.0 * flipped / n
    located = localisation.summarise(located)
    if located is not None:
        result["localisation"] = located
    return result
