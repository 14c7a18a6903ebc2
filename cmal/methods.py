"""What a run trains (--method, --ablation): CMAL-Net's iteration, one of its ablations, or the
plain fine-tuning baseline; and how each names its headline number.

cmal              the reference's five-step iteration (engine.train_step)
cmal, no_crops    every pass on the raw batch, no attention maps (engine.ABLATIONS)
cmal, no_joint_crop   the four passes without step 5 (all heads on the joint crop)
baseline          TResNet-L-V2 fine-tuned with one head (cmal.baseline)

Evaluation is the same for CMAL-Net and its ablations (engine.evaluate: the raw pass, the joint
crop pass, and the accuracies of concat, com2, combined and each expert); the baseline reports its
one head's accuracy, which stands in the "combined" column (best.pt, results_test.txt).
"""
import functools

from cmal import engine

METHODS = ("cmal", "baseline")


def iteration_for(cfg, cuda_graph=False):
    """The function one training batch runs (engine.train_one_epoch's `iteration`); with
    `cuda_graph`, CMAL-Net's replayed as a CUDA graph (the baseline's one pass stays eager)."""
    if cfg.method == "baseline":
        from cmal.baseline import baseline_train_step
        return baseline_train_step
    if cuda_graph:
        from cmal.cuda_graph import GraphedIteration
        return GraphedIteration(cfg.ablation)
    # engine.train_step looked up at each call: tests/killer.py replaces it.
    if cfg.ablation == "none":
        return engine.train_step
    return functools.partial(engine.train_step, ablation=cfg.ablation)


def describe(cfg):
    """The run's method in words, for its first log line."""
    if cfg.method == "baseline":
        return "baseline (TResNet-V2 fine-tuned with one head)"
    return "CMAL-Net" + ("" if cfg.ablation == "none" else f" (ablation {cfg.ablation})")


def headline(cfg):
    """What the "combined" accuracy is for this method."""
    return "single-head" if cfg.method == "baseline" else "combined"
