"""What a run trains (--ablation): CMAL-Net's iteration or one of its ablations.

none              the reference's five-step iteration (engine.train_step)
no_crops          every pass on the raw batch, no attention maps (engine.ABLATIONS)
no_joint_crop     the four passes without step 5 (all heads on the joint crop)

Evaluation is the same for CMAL-Net and its ablations (engine.evaluate: the raw pass, the joint
crop pass, and the accuracies of concat, com2, combined and each expert).
"""
import functools

from cmal import engine


def iteration_for(cfg):
    """The function one training batch runs (engine.train_one_epoch's `iteration`)."""
    # engine.train_step looked up at each call: tests/killer.py replaces it.
    if cfg.ablation == "none":
        return engine.train_step
    return functools.partial(engine.train_step, ablation=cfg.ablation)


def describe(cfg):
    """The run's method in words, for its first log line."""
    return "CMAL-Net" + ("" if cfg.ablation == "none" else f" (ablation {cfg.ablation})")
