"""What a run trains (--method, --ablation): the registry of methods.

cmal              the reference's five-step iteration (cmal/model.py, engine.train_step)
cmal, no_crops    every pass on the raw batch, no attention maps (engine.train_step's ablations)
cmal, no_joint_crop   the four passes without step 5 (all heads on the joint crop)
baseline          TResNet-L-V2 fine-tuned with one head (cmal/baseline.py)

Each entry says what the rest of the project may do with its method; its module builds the
network (`build(cfg, abn, weights)`) and says what one training batch runs
(`iteration(cfg, cuda_graph)`). Networks name their method (`network.method`). Evaluation is the
network's own `evaluation_logits`: CMAL-Net and its ablations score the raw pass and the joint
crop (concat, com2, combined and each expert); the baseline's one head stands in every column.
Adding a method is one entry here and one module.
"""
import importlib
from dataclasses import dataclass

# Variants of CMAL-Net's iteration (--ablation). none: the reference's. no_crops: no attention
# crops, every pass on the raw batch (no attention maps are computed; the two flags are still
# drawn, so the random stream stays the reference's). no_joint_crop: step 5 (all heads on the
# joint crop) left out: four passes and four optimizer steps, loss_att reported as 0.
ABLATIONS = ("none", "no_crops", "no_joint_crop")


@dataclass(frozen=True)
class Method:
    name: str
    module: str  # the module with build(cfg, abn, weights) and iteration(cfg, cuda_graph)
    title: str  # the run's first line names it so
    headline: str  # what its "combined" accuracy is
    experts: bool  # three experts with attention maps: per-expert scores, crops, pictures
    ablations: tuple = ("none",)

    def implementation(self):
        return importlib.import_module(self.module)

    def build(self, cfg, precision, weights=None, cuda_graph=False):
        """The network a run's settings describe, on the device of `precision` (a
        precision.Precision), its ABN chosen for that device and precision and whether it runs
        in CUDA graphs; `weights`: backbone weights for a new run."""
        abn = precision.abn_kind(cfg.abn, cuda_graph=cuda_graph)
        return self.implementation().build(cfg, abn, weights or None).to(precision.device)

    def iteration(self, cfg, cuda_graph=False):
        """The function one training batch runs (engine.train_one_epoch's `iteration`)."""
        return self.implementation().iteration(cfg, cuda_graph)

    def describe(self, cfg):
        return self.title + ("" if cfg.ablation == "none" else f" (ablation {cfg.ablation})")

    def losses_text(self, record):
        """An epoch line's losses after the total: each step's, where there are several."""
        if not self.experts:
            return ""
        return (f" (e1 {record['loss1']:.3f} e2 {record['loss2']:.3f} e3 {record['loss3']:.3f} "
                f"att {record['loss_att']:.3f} concat {record['loss_concat']:.3f})")

    def scores_text(self, t, best=None, split="test"):
        """The accuracies of an evaluation `t`, as the epoch lines and the final test print
        them; with `best`, the best so far too."""
        best_text = "" if best is None else f" (best {best:.2f}%)"
        if not self.experts:
            return f"{split} acc {t['acc_combined']:6.2f}%{best_text}"
        line = (f"{split} concat {t['acc_concat']:6.2f}% com2 {t['acc_com2']:6.2f}% combined "
                f"{t['acc_combined']:6.2f}%{best_text}")
        if "acc_expert1" in t:
            line += " experts " + "/".join(f"{t[f'acc_expert{i}']:.2f}" for i in (1, 2, 3)) + "%"
        return line

    def final_text(self, test):
        """The final test's accuracies (a run with --val_split)."""
        if not self.experts:
            return f"acc {test['acc_combined']:.2f}%"
        return (f"concat {test['acc_concat']:.2f}% com2 {test['acc_com2']:.2f}% combined "
                f"{test['acc_combined']:.2f}%")

    def test_only_text(self, result):
        """--test_only's line of accuracies and loss."""
        if not self.experts:
            return (f"test acc {result['acc_combined']:.2f}% (one head) loss "
                    f"{result['loss']:.4f} on {result['samples']} images")
        return (f"test concat {result['acc_concat']:.2f}% com2 {result['acc_com2']:.2f}% "
                f"combined {result['acc_combined']:.2f}% loss {result['loss']:.4f} on "
                f"{result['samples']} images; experts 1, 2, 3 alone "
                + ", ".join(f"{result[f'acc_expert{i}']:.2f}%" for i in (1, 2, 3)))


REGISTRY = {m.name: m for m in (
    Method("cmal", "cmal.model", "CMAL-Net", "combined", experts=True, ablations=ABLATIONS),
    Method("baseline", "cmal.baseline", "baseline (TResNet-V2 fine-tuned with one head)",
           "single-head", experts=False),
)}
METHODS = tuple(REGISTRY)


def method_of(cfg):
    """The registry's entry for a run's settings (or a checkpoint's)."""
    return REGISTRY[cfg.method]


def of_network(net):
    """The registry's entry for a network built by one of the methods."""
    return REGISTRY[net.method]
