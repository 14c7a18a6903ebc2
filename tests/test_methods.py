"""The plain fine-tuning baseline (--method=baseline) and CMAL-Net's ablations (--ablation): what
each iteration runs, how each is evaluated, and that each trains, resumes bitwise and evaluates
through the same run as CMAL-Net; the demo's comparison command."""
import copy
import json
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cmal import checkpoint as ckpt_io
from cmal.inference import load_trained
from cmal import engine
from cmal import settings
from cmal import train
from cmal.baseline import BaselineNet, baseline_train_step, build_baseline
from cmal.engine import evaluate, train_step
from cmal.model import build_cmal
from cmal.optimizer import make_optimizer
from cmal.tresnet import TResnetL_V2
from cmal.utils import cosine_anneal_schedule
from tests.conftest import TINY_ARGS, TINY_NET, make_image_folder
from tests.test_training_run import TEST_LINE, TRAIN_LINE, _stop_after, assert_same_weights

SMALL_BACKBONE = {"layers": TINY_NET["layers"], "width_factor": TINY_NET["width_factor"]}


def _tiny(num_classes=4):
    torch.manual_seed(0)
    return build_cmal(num_classes, abn="pure", **TINY_NET)


def _tiny_baseline(num_classes=4):
    torch.manual_seed(0)
    return build_baseline(num_classes, abn="pure", **SMALL_BACKBONE)


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


# ---- the baseline ----------------------------------------------------------------------
def test_baseline_is_tresnet_with_its_pooling_and_one_linear_head():
    net = _tiny_baseline(5)
    torch.manual_seed(0)
    tresnet = TResnetL_V2({"num_classes": 5, "abn": "pure", **SMALL_BACKBONE})
    # The published layout: the same keys, shapes and initial values as TResNet-L-V2's own.
    assert_same_weights(net.state_dict(), tresnet.state_dict())
    assert {k.split(".")[0] for k in net.state_dict()} == {"body", "head"}
    assert isinstance(net.head.fc, nn.Linear) and net.head.fc.out_features == 5
    x, _ = _batch(n=2)
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x), net.head.fc(net.body(x).mean((2, 3))))


def test_baseline_loads_published_weights_for_its_body(tmp_path):
    published = TResnetL_V2({"num_classes": 11, "abn": "pure", **SMALL_BACKBONE})
    for p in published.parameters():
        p.data.normal_()
    torch.save({"model": published.state_dict()}, tmp_path / "w.pth")
    net = build_baseline(3, weights=str(tmp_path / "w.pth"), abn="pure", **SMALL_BACKBONE)
    body = {k: v for k, v in published.state_dict().items() if k.startswith("body.")}
    assert_same_weights({k: v for k, v in net.state_dict().items() if k.startswith("body.")},
                        body)
    assert net.head.fc.weight.shape == (3, net.head.fc.in_features)  # its own head
    # A published head with this very class count is not taken either: the classifier is new.
    same = build_baseline(11, weights=str(tmp_path / "w.pth"), abn="pure", **SMALL_BACKBONE)
    assert not torch.equal(same.head.fc.weight, published.head.fc.weight)
    assert same.head.fc.weight.std() < 0.1  # its initialisation, not the saved N(0, 1)


def test_baseline_optimizer_two_groups():
    net = _tiny_baseline()
    opt = make_optimizer(net)
    assert [[id(p) for p in g["params"]] for g in opt.param_groups] == \
        [[id(p) for p in net.head.parameters()], [id(p) for p in net.body.parameters()]]
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(net.parameters()))
    assert [g["lr"] for g in opt.param_groups] == [0.002, 0.0002]
    assert all(g["momentum"] == 0.9 and g["weight_decay"] == 5e-4 for g in opt.param_groups)


def test_baseline_iteration_is_one_forward_and_one_sgd_step():
    net = _tiny_baseline()
    expected = copy.deepcopy(net)
    opt = make_optimizer(net)
    seen, steps = _spy(net, opt)
    inputs, targets = _batch()
    out = baseline_train_step(net, opt, inputs, targets, nn.CrossEntropyLoss(), epoch=30,
                              nb_epoch=40)
    assert len(seen) == 1 and seen[0] is inputs and len(steps) == 1
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(
        [cosine_anneal_schedule(30, 40, 0.002), cosine_anneal_schedule(30, 40, 0.0002)])
    # The same step written out: plain SGD with the two groups' rates.
    sgd = torch.optim.SGD([{"params": expected.head.parameters(),
                            "lr": cosine_anneal_schedule(30, 40, 0.002)},
                           {"params": expected.body.parameters(),
                            "lr": cosine_anneal_schedule(30, 40, 0.0002)}],
                          momentum=0.9, weight_decay=5e-4)
    logits = expected(inputs)
    loss = F.cross_entropy(logits, targets)
    loss.backward()
    sgd.step()
    assert_same_weights(net.state_dict(), expected.state_dict())
    assert out["loss_concat"] == pytest.approx(loss.item())
    assert [out[k] for k in ("loss1", "loss2", "loss3", "loss_att")] == [0.0] * 4
    assert out["correct"] == int((logits.argmax(1) == targets).sum())


def test_baseline_non_finite_loss_raises():
    net = _tiny_baseline()
    inputs, targets = _batch()
    inputs[0, 0, 0, 0] = float("nan")
    with pytest.raises(engine.NonFiniteError, match="loss"):
        baseline_train_step(net, make_optimizer(net), inputs, targets, nn.CrossEntropyLoss())


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


def test_evaluate_baseline_reports_its_one_head():
    net = _tiny_baseline()
    inputs, targets = _batch(n=7)
    loader = [(inputs[:4], targets[:4], 0), (inputs[4:], targets[4:], 0)]
    got = evaluate(net, loader, nn.CrossEntropyLoss(), num_classes=4, flip=True)
    with torch.no_grad():
        logits = net.eval()(inputs)
        mirrored = net(inputs.flip(3))
    acc = _accuracy(logits, targets)
    assert got["acc_combined"] == got["acc_concat"] == got["acc_com2"] == pytest.approx(acc)
    assert got["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    assert got["acc_combined_flip"] == pytest.approx(_accuracy(logits + mirrored, targets))
    assert not any(k.startswith("acc_expert") for k in got)
    assert sum(map(sum, got["confusion"])) == 7


# ---- settings -----------------------------------------------------------------------------
def test_method_and_ablation_are_validated(capsys):
    cfg = settings.parse({"data_path": "d"}, [])
    assert (cfg.method, cfg.ablation) == ("cmal", "none")
    for argv in (["--method=resnet"], ["--ablation=no_experts"]):
        with pytest.raises(SystemExit):
            settings.parse({"data_path": "d"}, argv)
        assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        settings.parse({"data_path": "d"}, ["--method=baseline", "--ablation=no_crops"])
    assert "the baseline has none" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a dataset script's block is not checked by argparse
        settings.parse({"data_path": "d", "method": "Baseline"}, [])
    assert "--method must be one of cmal, baseline, got 'Baseline'" in capsys.readouterr().err


def test_a_checkpoint_without_them_reads_as_cmal():
    saved = settings.Settings(data_path="d", method="baseline").to_dict()
    assert settings.Settings.from_checkpoint(saved).method == "baseline"
    older = {k: v for k, v in saved.items() if k not in ("method", "ablation")}
    restored = settings.Settings.from_checkpoint(older)
    assert (restored.method, restored.ablation) == ("cmal", "none")


# ---- whole runs ---------------------------------------------------------------------------
VARIANTS = {"baseline": ["--method=baseline"], "no_crops": ["--ablation=no_crops"],
            "no_joint_crop": ["--ablation=no_joint_crop"]}


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
    method, ablation = ("baseline", "none") if variant == "baseline" else ("cmal", variant)
    assert (resumed["settings"]["method"], resumed["settings"]["ablation"]) == (method, ablation)


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
    if variant == "baseline":
        assert "baseline (TResNet-V2 fine-tuned with one head): 24 train" in printed
        assert re.search(r"epoch +1/2 \| train acc +[0-9.]+% loss [0-9.]+ \| test acc ", printed)
        assert "(e1 " not in printed and "best single-head test accuracy" in printed
        assert all(r["loss1"] == r["loss2"] == r["loss3"] == r["loss_att"] == 0 for r in records)
        assert all(r["train_loss"] == r["loss_concat"] > 0 for r in records)
        assert all(t["acc_combined"] == t["acc_concat"] == t["acc_com2"] for t in tests)
        assert not any("acc_expert1" in t for t in tests)
    else:
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
    if variant == "baseline":
        assert f"test acc {last['acc_combined']:.2f}% (one head) loss {last['loss']:.4f}" in printed
        assert "top-5 (single-head)" in printed
    else:
        assert (f"combined {last['acc_combined']:.2f}% loss {last['loss']:.4f} on 9 images; "
                f"experts 1, 2, 3 alone {last['acc_expert1']:.2f}%") in printed


def test_resume_and_evaluation_refuse_another_method_or_ablation(image_folder, tmp_path, capsys):
    base, crops = tmp_path / "base", tmp_path / "crops"
    assert run(image_folder, base, "--epochs=1", "--method=baseline") == 0
    assert run(image_folder, crops, "--epochs=1", "--ablation=no_crops") == 0
    before = (base / "last.pt").read_bytes()
    capsys.readouterr()
    cases = [(base, ["--resume", "--epochs=2", "--extend", "--method=cmal"],
              "--method=cmal (it was trained with baseline)"),
             (crops, ["--resume", "--epochs=2", "--extend", "--ablation=none"],
              "--ablation=none (it was trained with no_crops)"),
             (base, ["--test_only", f"--resume={base / 'last.pt'}", "--method=cmal"],
              "--method=cmal (it was trained with baseline)")]
    for out, argv, message in cases:
        assert run(image_folder, out, *argv) == 2, argv
        assert message in capsys.readouterr().err, argv
    assert (base / "last.pt").read_bytes() == before


def test_tools_on_a_baseline_checkpoint(image_folder, tmp_path, capsys):
    from cmal.data import build_transforms
    from cmal.images import load_rgb
    from cmal.tools import attention, plot_curves, predict
    out = tmp_path / "run"
    assert run(image_folder, out, "--epochs=1", "--method=baseline") == 0
    capsys.readouterr()
    image = sorted((image_folder / "test").rglob("*.jpg"))[0]
    assert predict.main([str(out / "last.pt"), str(image), "--topk=3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    model, classes, cfg = load_trained(out / "last.pt")
    assert isinstance(model, BaselineNet)
    x = build_transforms(cfg.image_size, cfg.resize, cfg.crop_padding)[1](load_rgb(image))
    with torch.no_grad():
        probs = torch.softmax(model(x[None]), 1)[0]
    shown = [float(line.split()[-1]) for line in printed[1:]]
    assert shown == pytest.approx(sorted(probs.tolist(), reverse=True), abs=1e-4)
    assert attention.main([str(out / "last.pt"), str(image), f"--out={tmp_path / 'maps'}"]) == 2
    assert "no attention maps" in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()
    assert plot_curves.main([str(out), f"--out={tmp_path / 'curves.png'}"]) == 0
    assert (tmp_path / "curves.png").stat().st_size > 0


@pytest.mark.slow
def test_baseline_under_torchrun(tmp_path, capsys):
    from tests.test_distributed import ARGS, torchrun
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "ddp"
    proc = torchrun("ddp_probe.py", f"--data_path={data}", f"--output_dir={out}", "--epochs=2",
                    "--method=baseline", *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "baseline (TResNet-V2 fine-tuned with one head)" in proc.stdout
    assert "x 2 processes" in proc.stdout
    assert_same_weights(torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt"))
    assert_same_weights(torch.load(out / "rank0.pt"), ckpt_io.load(out / "last.pt")["model"])
    last = json.loads((out / "log.jsonl").read_text().splitlines()[-1])["test"]
    assert last["samples"] == 9  # every test image counted once over the two ranks
    assert train.main({"data_path": str(data), "output_dir": str(out)},
                      ARGS + ["--test_only", f"--resume={out / 'last.pt'}"]) == 0
    assert (f"test acc {last['acc_combined']:.2f}% (one head) loss {last['loss']:.4f} on 9 "
            "images") in capsys.readouterr().out


# ---- the demo's comparison -----------------------------------------------------------------
def _compare(image_folder, tmp_path, *extra):
    from cmal.tools import demo
    return demo.main(["--compare", f"--compare_dir={tmp_path / 'cmp'}",
                      f"--data_path={image_folder}", "--num_classes=3", *TINY_ARGS, *extra])


def test_compare_trains_each_method_and_seed_and_prints_the_table(image_folder, tmp_path, capsys):
    assert _compare(image_folder, tmp_path, "--methods=cmal,baseline,no_joint_crop",
                    "--seeds=0,1", "--epochs=2") == 0
    printed = capsys.readouterr().out
    root = tmp_path / "cmp"
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == ["baseline_seed0", "baseline_seed1", "cmal_seed0", "cmal_seed1",
                       "no_joint_crop_seed0", "no_joint_crop_seed1"]
    assert ckpt_io.load(root / "baseline_seed1" / "last.pt")["settings"]["seed"] == 1
    assert ckpt_io.load(root / "no_joint_crop_seed0" / "last.pt")["settings"]["ablation"] == \
        "no_joint_crop"
    assert not torch.equal(  # the seeds give different runs
        ckpt_io.load(root / "cmal_seed0" / "last.pt")["model"]["classifier1.4.weight"],
        ckpt_io.load(root / "cmal_seed1" / "last.pt")["model"]["classifier1.4.weight"])
    table = (root / "comparison.md").read_text()
    assert table.split("\n\n")[0] in printed
    rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert set(rows) == {"method", "CMAL-Net", "baseline (one head)",
                         "CMAL-Net, no joint-crop step"}
    # The baseline's best accuracy: mean ± sample std of the two runs' logs.
    best = [max(json.loads(line)["test"]["acc_combined"] for line in
                (root / f"baseline_seed{s}" / "log.jsonl").read_text().splitlines())
            for s in (0, 1)]
    mean, std = sum(best) / 2, abs(best[0] - best[1]) / 2 ** 0.5
    assert rows["baseline (one head)"][1:4] == ["2", "2", f"{mean:.2f} ± {std:.2f}"]
    per_run = (root / "runs.csv").read_text().splitlines()
    assert len(per_run) == 7 and per_run[0].startswith("method,seed,epochs,best_acc")


def test_compare_continues_with_resume_and_refuses_what_it_decides(image_folder, tmp_path,
                                                                   monkeypatch, capsys):
    args = ["--methods=baseline", "--seeds=0,1", "--epochs=2"]
    with monkeypatch.context() as m:
        _stop_after(m, 3)  # inside the first run
        assert _compare(image_folder, tmp_path, *args) == 143
    assert "run the same command with --resume to continue it" in capsys.readouterr().err
    assert _compare(image_folder, tmp_path, *args, "--resume") == 0
    assert "resumed from" in capsys.readouterr().out
    assert _compare(image_folder, tmp_path, *args, "--resume") == 0  # finished: read back
    assert "| baseline (one head) | 2 | 2 |" in capsys.readouterr().out
    for bad, message in [("--seed=3", "the comparison sets --seed"),
                         ("--methods=cmal,resnet", "expected distinct names among"),
                         ("--seeds=0,x", "expected comma-separated integers"),
                         ("--lr=-1", "--lr cannot be negative")]:
        with pytest.raises(SystemExit):
            _compare(image_folder, tmp_path / "other", *args, bad)
        assert message in capsys.readouterr().err, bad
    assert not (tmp_path / "other").exists()
