"""CMAL-Net's ablations (--ablation): what each iteration runs, and that each trains, resumes
bitwise and evaluates through the same run as CMAL-Net; each expert's accuracy in evaluation."""
import json
import re

import pytest
import torch
import torch.nn as nn

from cmal import checkpoint as ckpt_io
from cmal import engine
from cmal import settings
from cmal import train
from cmal.engine import evaluate, train_step
from cmal.model import build_cmal
from cmal.optimizer import make_optimizer
from tests.conftest import TINY_ARGS, TINY_NET
from tests.test_training_run import TEST_LINE, TRAIN_LINE, _stop_after, assert_same_weights


def _tiny(num_classes=4):
    torch.manual_seed(0)
    return build_cmal(num_classes, abn="pure", **TINY_NET)


def _batch(n=4, side=64, num_classes=4):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 3, side, side, generator=g), torch.arange(n) % num_classes


def _spy(net, optimizer):
    """The input of every forward of `net`, and a list that grows by one per optimizer step."""
    seen, steps = [], []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    optimizer.register_step_post_hook(lambda *a: steps.append(1))
    return seen, steps


def _forbid(monkeypatch, *names):
    def fail(*args, **kwargs):
        raise AssertionError("an attention helper was called")
    for name in names:
        monkeypatch.setattr(engine, name, fail)


# ---- the ablations' iterations ------------------------------------------------------------
def test_the_reference_iteration_feeds_crops():
    """The spy below can fail: the reference's step 5 gets the joint crop, not the raw batch."""
    net = _tiny()
    opt = make_optimizer(net)
    seen, steps = _spy(net, opt)
    inputs, targets = _batch()
    train_step(net, opt, inputs, targets, nn.CrossEntropyLoss())
    assert len(seen) == 5 and len(steps) == 5
    assert seen[0] is inputs and seen[4] is inputs
    assert not torch.equal(seen[3], inputs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_crops_feeds_the_raw_batch_to_every_pass(monkeypatch, seed):
    net = _tiny()
    opt = make_optimizer(net)
    seen, steps = _spy(net, opt)
    _forbid(monkeypatch, "attention_maps", "attention_im", "highlight_im")
    inputs, targets = _batch()
    torch.manual_seed(seed)
    out = train_step(net, opt, inputs, targets, nn.CrossEntropyLoss(), ablation="no_crops")
    after = torch.get_rng_state()
    assert len(seen) == 5 and len(steps) == 5
    assert all(x is inputs for x in seen)
    assert out["loss_att"] > 0
    torch.manual_seed(seed)
    torch.rand(1), torch.rand(1)  # the reference's two flags: the random stream is the same
    assert torch.equal(after, torch.get_rng_state())


def test_no_joint_crop_skips_step_five(monkeypatch):
    ref, ours = _tiny(), _tiny()
    opt_ref, opt_ours = make_optimizer(ref), make_optimizer(ours)
    seen_ref, _ = _spy(ref, opt_ref)
    seen, steps = _spy(ours, opt_ours)
    inputs, targets = _batch()
    torch.manual_seed(3)
    train_step(ref, opt_ref, inputs, targets, nn.CrossEntropyLoss())
    _forbid(monkeypatch, "highlight_im")
    torch.manual_seed(3)
    out = train_step(ours, opt_ours, inputs, targets, nn.CrossEntropyLoss(),
                     ablation="no_joint_crop")
    assert len(seen) == 4 and len(steps) == 4 and out["loss_att"] == 0.0
    # Steps 1-3 as the reference's (the same inputs, crops included), then step 6 on the raw batch.
    for a, b in zip(seen[:3], seen_ref[:3]):
        torch.testing.assert_close(a, b)
    assert seen[3] is inputs


def test_an_unknown_ablation_is_refused():
    net = _tiny()
    with pytest.raises(ValueError, match="no_crops"):
        train_step(net, make_optimizer(net), *_batch(), nn.CrossEntropyLoss(), ablation="crops")


# ---- evaluation ---------------------------------------------------------------------------
def _accuracy(logits, targets):
    return 100 * (logits.argmax(1) == targets).float().mean().item()


def test_evaluate_reports_each_experts_accuracy():
    net = _tiny()
    inputs, _ = _batch(n=9)
    net.eval()
    with torch.no_grad():
        out = net(inputs)
    # Targets each expert gets partly right, and differently.
    targets = torch.where(torch.arange(9) % 2 == 0, out[0].argmax(1), out[2].argmax(1))
    loader = [(inputs[:5], targets[:5], 0), (inputs[5:], targets[5:], 0)]
    got = evaluate(net, loader, nn.CrossEntropyLoss())
    for i in (1, 2, 3):
        assert got[f"acc_expert{i}"] == pytest.approx(_accuracy(out[i - 1], targets))
    assert len({got[f"acc_expert{i}"] for i in (1, 2, 3)}) > 1


# ---- settings -----------------------------------------------------------------------------
def test_ablation_is_validated(capsys):
    cfg = settings.parse({"data_path": "d"}, [])
    assert cfg.ablation == "none"
    with pytest.raises(SystemExit):
        settings.parse({"data_path": "d"}, ["--ablation=no_experts"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a dataset script's block is not checked by argparse
        settings.parse({"data_path": "d", "ablation": "no-crops"}, [])
    assert ("--ablation must be one of none, no_crops, no_joint_crop, got 'no-crops'"
            in capsys.readouterr().err)


def test_a_checkpoint_without_it_reads_as_the_reference_iteration():
    saved = settings.Settings(data_path="d", ablation="no_crops").to_dict()
    assert settings.Settings.from_checkpoint(saved).ablation == "no_crops"
    older = {k: v for k, v in saved.items() if k != "ablation"}
    assert settings.Settings.from_checkpoint(older).ablation == "none"


# ---- whole runs ---------------------------------------------------------------------------
VARIANTS = {"no_crops": ["--ablation=no_crops"], "no_joint_crop": ["--ablation=no_joint_crop"]}


def run(data, out, *extra):
    return train.main({"data_path": str(data), "num_classes": 3, "output_dir": str(out)},
                      TINY_ARGS + list(extra))


def _strip_times(text):
    return re.sub(r'"time": [0-9.e-]+', "", text)


@pytest.mark.parametrize("variant", VARIANTS)
# Stopped inside epoch 1, and inside epoch 2 after an evaluation (see test_training_run).
@pytest.mark.parametrize("stop_at", [4, 10])
def test_variant_trains_and_resumes_bitwise(image_folder, tmp_path, monkeypatch, variant,
                                            stop_at):
    args = ["--epochs=3", "--eval_every=1", *VARIANTS[variant]]
    assert run(image_folder, tmp_path / "full", *args) == 0
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        _stop_after(m, stop_at)
        assert run(image_folder, out, *args) == 143
    assert ckpt_io.load(out / "last.pt")["stats"]["position"] in (4, 3)
    # Resumed without naming the variant: it comes from the checkpoint.
    assert run(image_folder, out, "--epochs=3", "--eval_every=1", "--resume") == 0
    full, resumed = ckpt_io.load(tmp_path / "full" / "last.pt"), ckpt_io.load(out / "last.pt")
    assert_same_weights(full["model"], resumed["model"])
    assert full["optimizer"]["param_groups"] == resumed["optimizer"]["param_groups"]
    for name in ("results_train.txt", "results_test.txt", "log.jsonl", "summary.csv"):
        strip = _strip_times if name == "log.jsonl" else (
            lambda t: re.sub(r",[0-9.]+\n", "\n", t))  # summary.csv's last column: time
        assert strip((out / name).read_text()) == strip((tmp_path / "full" / name).read_text())
    assert resumed["settings"]["ablation"] == variant


@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_logs_and_evaluates(image_folder, tmp_path, capsys, variant):
    out = tmp_path / "run"
    assert run(image_folder, out, "--epochs=2", "--eval_every=1", *VARIANTS[variant]) == 0
    printed = capsys.readouterr().out
    train_lines = (out / "results_train.txt").read_text().splitlines()
    assert len(train_lines) == 2 and all(TRAIN_LINE.match(line) for line in train_lines)
    test_lines = (out / "results_test.txt").read_text().splitlines()
    assert len(test_lines) == 2 and all(TEST_LINE.match(line) for line in test_lines)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    tests = [r["test"] for r in records]
    assert all(0 < t["time"] < r["time"] for t, r in zip(tests, records))
    assert f"CMAL-Net (ablation {variant}): 24 train" in printed
    t = tests[-1]
    assert (f"(best {max(x['acc_combined'] for x in tests):.2f}%) experts "
            f"{t['acc_expert1']:.2f}/{t['acc_expert2']:.2f}/{t['acc_expert3']:.2f}%") in printed
    assert all((r["loss_att"] == 0) == (variant == "no_joint_crop") for r in records)
    best = ckpt_io.load(out / "best.pt")
    assert best["best_acc"] == max(t["acc_combined"] for t in tests)
    # --test_only: the checkpoint's method, evaluated as during training.
    assert run(image_folder, out, "--test_only", f"--resume={out / 'last.pt'}") == 0
    printed = capsys.readouterr().out
    last = tests[-1]
    assert (f"combined {last['acc_combined']:.2f}% loss {last['loss']:.4f} on 9 images; "
            f"experts 1, 2, 3 alone {last['acc_expert1']:.2f}%") in printed


def test_resume_and_evaluation_refuse_another_ablation(image_folder, tmp_path, capsys):
    crops = tmp_path / "crops"
    assert run(image_folder, crops, "--epochs=1", "--ablation=no_crops") == 0
    before = (crops / "last.pt").read_bytes()
    capsys.readouterr()
    for argv in (["--resume", "--epochs=2", "--extend", "--ablation=none"],
                 ["--test_only", f"--resume={crops / 'last.pt'}", "--ablation=none"]):
        assert run(image_folder, crops, *argv) == 2, argv
        assert "--ablation=none (it was trained with no_crops)" in capsys.readouterr().err, argv
    assert (crops / "last.pt").read_bytes() == before
