"""What a run reports and selects, and the data it trains on, against the reference's
specification (CMAL_SPEC.md sections 4 and 5) or against values recomputed here by hand from a
tiny run: every column of log.jsonl, summary.csv, results_train.txt and results_test.txt; the
accuracy best.pt is chosen on; top-5 and flip scoring; the transforms; the seeds; the hold-out
counts; the last partial batch.

tools/mutants.py measures how many small deliberate bugs of these kinds the tests catch.
"""
import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

from cmal import checkpoint as ckpt_io
from cmal.inference import load_trained
from cmal import engine
from cmal import settings
from cmal import train
from cmal.data import build_loaders, build_transforms, hold_out
from cmal.images import load_rgb
from cmal.engine import evaluate
from cmal.inference import per_class_rows
from cmal.distributed import unwrap
from cmal.model import build_cmal
from tests.conftest import TINY_ARGS, TINY_NET, make_image_folder
from tests.test_engine import _ref_crop, _ref_norm, _ref_up, ref_map_generate

# The reference's log lines, as CMAL_SPEC.md section 5 writes them.
SPEC_TRAIN_LINE = ("Iteration %d | train_acc = %.5f | train_loss = %.5f | Loss1: %.3f | "
                   "Loss2: %.5f | Loss3: %.5f | Loss_ATT: %.5f | Loss_concat: %.5f |")
SPEC_TEST_LINE = "Iteration %d, test_acc_combined = %.5f, test_loss = %.6f"
LOSSES = ("loss1", "loss2", "loss3", "loss_att", "loss_concat")


def spec_transforms(image_size, resize, padding):
    """CMAL_SPEC.md section 5, transcribed: the TResNet-L train and test transforms."""
    normalize = T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    return (T.Compose([T.Resize((resize, resize)), T.RandomCrop(image_size, padding=padding),
                       T.RandomHorizontalFlip(), T.ToTensor(), normalize]),
            T.Compose([T.Resize((resize, resize)), T.CenterCrop(image_size), T.ToTensor(),
                       normalize]))


def cosine(epoch, epochs, base):
    """The reference's cosine_anneal_schedule, by hand."""
    return base / 2 * (math.cos(math.pi * (epoch % epochs) / epochs) + 1)


# ---- the reference's evaluation, per sample (spec section 5) ----------------------------------
def spec_joint_crop(images, maps):
    """highlight_im of the reference, per sample; an empty mask keeps the whole image (spec
    section 3)."""
    _, _, H, W = images.shape
    crops = []
    for b, image in enumerate(images):
        mask = _ref_norm(sum(_ref_norm(_ref_up(m[b], H, W)) for m in maps))
        crops.append(_ref_crop(image, mask, 0.5, 0.1) if (mask >= 0.5).any() and
                     torch.isfinite(mask).all() else image)
    return torch.stack(crops)


@torch.no_grad()
def spec_scores(net, x):
    """(concat, com2, com, experts 1-3) logits of a batch as the reference's test loop computes
    them."""
    net.eval()
    out = net(x)
    maps = [ref_map_generate(out[4 + i], out[i], getattr(net, f"classifier{i + 1}")[1].weight,
                             getattr(net, f"classifier{i + 1}")[4].weight) for i in range(3)]
    att = net(spec_joint_crop(x, maps))
    com2 = out[0] + out[1] + out[2] + out[3]
    return out[3], com2, com2 + att[0] + att[1] + att[2] + att[3], out[:3]


def spec_evaluation(net, loader):
    """The accuracies (%) and the mean test loss of `net` over `loader`, by hand."""
    correct = {k: 0 for k in ("concat", "com2", "combined", "e1", "e2", "e3")}
    loss, n = 0.0, 0
    for x, y, _ in loader:
        concat, com2, com, experts = spec_scores(net, x)
        for key, logits in zip(correct, (concat, com2, com, *experts)):
            correct[key] += int((logits.argmax(1) == y).sum())
        loss += F.cross_entropy(concat, y, reduction="sum").item()
        n += len(y)
    acc = {k: 100.0 * v / n for k, v in correct.items()}
    return {"acc_concat": acc["concat"], "acc_com2": acc["com2"], "acc_combined": acc["combined"],
            "acc_expert1": acc["e1"], "acc_expert2": acc["e2"], "acc_expert3": acc["e3"],
            "loss": loss / n, "samples": n}


# ---- a tiny run, with every iteration and evaluation recorded ----------------------------------
RUN_ARGS = ["--epochs=2", "--eval_every=1", "--backbone_lr=0.004", "--test_batch_size=4"]


def _recorded_run(root, monkeypatch, seed):
    """Train 2 epochs on 27 training images (6 batches of 4 and 3 left over) and 9 test images
    (batches of 4, 4, 1), recording what each iteration returned and what each evaluation
    returned and would have returned by hand."""
    data = root / "data"
    if not data.exists():
        make_image_folder(data, train=9, test=3)
    steps, evaluations = [], []
    real_step, real_evaluate = engine.train_step, train.evaluate

    def step(net, optimizer, inputs, targets, criterion, epoch=None, nb_epoch=None, **kw):
        rng = torch.get_rng_state()
        out = real_step(net, optimizer, inputs, targets, criterion, epoch, nb_epoch, **kw)
        steps.append({"epoch": epoch, "rng": rng, "size": len(targets),
                      "correct": int((out["logits_concat"].argmax(1) == targets).sum()),
                      "reported_correct": out["correct"], **{k: out[k] for k in LOSSES},
                      "lrs": [g["lr"] for g in optimizer.param_groups]})
        return out

    def scored(net, loader, *args, **kwargs):
        result = real_evaluate(net, loader, *args, **kwargs)
        evaluations.append({"result": result, "by_hand": spec_evaluation(unwrap(net), loader),
                            "weights": {k: v.clone() for k, v in unwrap(net).state_dict().items()}})
        return result

    monkeypatch.setattr(engine, "train_step", step)
    monkeypatch.setattr(train, "evaluate", scored)
    torch.manual_seed(0)
    out = root / f"run{seed}"
    assert train.main({"data_path": str(data), "num_classes": 3, "output_dir": str(out)},
                      TINY_ARGS + RUN_ARGS + [f"--seed={seed}"]) == 0
    monkeypatch.undo()
    return out, steps, evaluations


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("recorded")
    with pytest.MonkeyPatch.context() as m:
        runs = {seed: _recorded_run(root, m, seed) for seed in (0, 1)}
    return runs


def expected_records(steps, evaluations, epochs=2, lr=0.01, backbone_lr=0.004):
    """log.jsonl's records recomputed from the iterations: accuracy over samples, losses per
    batch, train_loss = loss1 + loss2 + loss3 + loss_concat (spec section 5), the scheduled rates
    of the first and the backbone group, and the epoch's evaluation."""
    records = []
    for epoch in range(epochs):
        mine = [s for s in steps if s["epoch"] == epoch]
        n = len(mine)
        record = {"epoch": epoch + 1,
                  "train_acc": 100.0 * sum(s["correct"] for s in mine) / sum(s["size"] for s in mine),
                  "train_loss": sum(s["loss1"] + s["loss2"] + s["loss3"] + s["loss_concat"]
                                    for s in mine) / n,
                  **{k: sum(s[k] for s in mine) / n for k in LOSSES},
                  "samples": sum(s["size"] for s in mine), "skipped": 0,
                  "lr": cosine(epoch, epochs, lr), "backbone_lr": cosine(epoch, epochs, backbone_lr),
                  "test": evaluations[epoch]["by_hand"]}
        records.append(record)
    return records


def read_jsonl(out):
    return [json.loads(line) for line in (out / ckpt_io.JSON_LOG).read_text().splitlines()]


def test_iterations_and_evaluations_are_what_the_spec_says(recorded):
    _, steps, evaluations = recorded[0]
    # 27 images in batches of 4: the partial batch of 3 is never trained on.
    assert [s["size"] for s in steps] == [4] * 12
    assert [s["epoch"] for s in steps] == [0] * 6 + [1] * 6
    for s in steps:
        assert s["reported_correct"] == s["correct"]  # argmax of step 6's concat logits
        epoch = s["epoch"]
        assert s["lrs"] == pytest.approx([cosine(epoch, 2, 0.01)] * 7 + [cosine(epoch, 2, 0.004)])
    for e in evaluations:
        by_hand, got = e["by_hand"], e["result"]
        assert by_hand["samples"] == 9  # the last test batch of one image counts
        for key in ("acc_concat", "acc_com2", "acc_combined", "acc_expert1", "acc_expert2",
                    "acc_expert3", "samples"):
            assert got[key] == pytest.approx(by_hand[key], abs=1e-9), key
        assert got["loss"] == pytest.approx(by_hand["loss"], rel=1e-5)


def test_log_jsonl_holds_every_field_recomputed_by_hand(recorded):
    out, steps, evaluations = recorded[0]
    records = read_jsonl(out)
    expected = expected_records(steps, evaluations)
    assert len(records) == len(expected) == 2
    for got, want in zip(records, expected):
        assert set(got) == set(want) | {"time"}
        for key, value in want.items():
            if key == "test":
                assert set(got["test"]) == set(value) | {"time"}
                for k, v in value.items():
                    assert got["test"][k] == pytest.approx(v, rel=1e-5, abs=1e-9), k
                assert 0 <= got["test"]["time"] <= got["time"]
            else:
                assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_summary_csv_holds_every_column_recomputed_by_hand(recorded):
    out, steps, evaluations = recorded[0]
    rows = list(csv.reader((out / ckpt_io.SUMMARY).open()))
    assert rows[0] == ["epoch", "train_loss", "train_acc", "eval_loss", "eval_acc_concat",
                       "eval_acc_com2", "eval_acc_combined", "lr", "backbone_lr", "time"]
    times = [r["time"] for r in read_jsonl(out)]
    for row, want, time in zip(rows[1:], expected_records(steps, evaluations), times, strict=True):
        cells = dict(zip(rows[0], map(float, row)))
        assert cells.pop("time") == pytest.approx(time, abs=0.051)  # written to 0.1 s
        t = want["test"]
        assert cells == pytest.approx({
            "epoch": want["epoch"], "train_loss": want["train_loss"], "train_acc": want["train_acc"],
            "eval_loss": t["loss"], "eval_acc_concat": t["acc_concat"], "eval_acc_com2": t["acc_com2"],
            "eval_acc_combined": t["acc_combined"], "lr": want["lr"],
            "backbone_lr": want["backbone_lr"]}, abs=1e-4)


def test_reference_logs_are_the_spec_lines_of_the_values_by_hand(recorded):
    out, steps, evaluations = recorded[0]
    expected = expected_records(steps, evaluations)
    # Epochs counted from 0, as the reference numbers them.
    assert (out / ckpt_io.TRAIN_LOG).read_text().splitlines() == [
        SPEC_TRAIN_LINE % (r["epoch"] - 1, r["train_acc"], r["train_loss"],
                           *(r[k] for k in LOSSES)) for r in expected]
    assert (out / ckpt_io.TEST_LOG).read_text().splitlines() == [
        SPEC_TEST_LINE % (r["epoch"] - 1, r["test"]["acc_combined"], r["test"]["loss"])
        for r in expected]


def test_best_is_the_first_epoch_of_the_highest_combined_accuracy(recorded):
    out, _, evaluations = recorded[0]
    combined = [e["by_hand"]["acc_combined"] for e in evaluations]
    best = combined.index(max(combined))
    ck = ckpt_io.load(out / "best.pt")
    assert (ck["best_epoch"], ck["epoch"], ck["best_acc"]) == (best, best + 1, combined[best])
    for k, v in ck["model"].items():
        assert torch.equal(v, evaluations[best]["weights"][k]), k


def test_crop_flags_depend_on_the_seed_and_the_epoch(recorded):
    """The random stream the iterations draw their crop flags from starts each epoch from the
    run seed and the epoch (so that a restarted epoch repeats)."""
    first = {(seed, s["epoch"]): s["rng"] for seed, (_, steps, _) in recorded.items()
             for s in reversed(steps)}
    assert not torch.equal(first[0, 0], first[0, 1])
    assert not torch.equal(first[0, 0], first[1, 0])
    assert not torch.equal(first[0, 1], first[1, 1])


# ---- best.pt and every evaluation column, with evaluation scripted -------------------------------
# Per evaluated epoch: concat, com2, combined, loss. Epoch 2 is best on combined; epoch 3 ties it
# (the first stays best); concat and com2 would choose epoch 4.
SCRIPT = [(90.0, 10.0, 20.0, 1.5), (10.0, 90.0, 50.0, 1.25), (95.0, 95.0, 50.0, 1.0),
          (99.0, 99.0, 30.0, 0.75)]


def test_best_pt_is_chosen_on_combined_and_every_column_comes_from_its_own_number(
        tmp_path, monkeypatch, capsys):
    data = make_image_folder(tmp_path / "data", train=4)  # 3 iterations an epoch
    calls = []

    def scripted(net, loader, *args, **kwargs):
        concat, com2, combined, loss = SCRIPT[len(calls)]
        calls.append({k: v.clone() for k, v in unwrap(net).state_dict().items()})
        return {"acc_concat": concat, "acc_com2": com2, "acc_combined": combined, "loss": loss,
                "samples": len(loader.dataset), "acc_expert1": 1.0, "acc_expert2": 2.0,
                "acc_expert3": 3.0}

    monkeypatch.setattr(train, "evaluate", scripted)
    out = tmp_path / "run"
    assert train.main({"data_path": str(data), "output_dir": str(out)},
                      TINY_ARGS + ["--epochs=4", "--eval_every=1"]) == 0
    printed = capsys.readouterr().out
    best, last = ckpt_io.load(out / "best.pt"), ckpt_io.load(out / "last.pt")
    assert (best["epoch"], best["best_epoch"], best["best_acc"]) == (2, 1, 50.0)
    assert (last["epoch"], last["best_epoch"], last["best_acc"]) == (4, 1, 50.0)
    for k, v in best["model"].items():
        assert torch.equal(v, calls[1][k]), k
    assert "done: best combined test accuracy 50.00% at epoch 2" in printed
    lines = [line for line in printed.splitlines() if line.startswith("epoch ")]
    for line, (concat, com2, combined, _), best_so_far in zip(lines, SCRIPT, (20, 50, 50, 50)):
        assert (f"test concat {concat:6.2f}% com2 {com2:6.2f}% combined {combined:6.2f}% "
                f"(best {best_so_far:.2f}%) experts 1.00/2.00/3.00%") in line
    records = read_jsonl(out)
    for r, (concat, com2, combined, loss) in zip(records, SCRIPT, strict=True):
        assert {k: r["test"][k] for k in ("acc_concat", "acc_com2", "acc_combined", "loss")} == \
            {"acc_concat": concat, "acc_com2": com2, "acc_combined": combined, "loss": loss}
    rows = list(csv.DictReader((out / ckpt_io.SUMMARY).open()))
    assert [(float(r["eval_acc_concat"]), float(r["eval_acc_com2"]),
             float(r["eval_acc_combined"]), float(r["eval_loss"])) for r in rows] == SCRIPT
    assert (out / ckpt_io.TEST_LOG).read_text().splitlines() == [
        SPEC_TEST_LINE % (e, combined, loss) for e, (_, _, combined, loss) in enumerate(SCRIPT)]


# ---- top-5, flip scoring and the per-class report -----------------------------------------------
def _tiny(num_classes):
    """A tiny CMAL-Net whose scores tell inputs apart: its normalisation statistics are those of
    one random batch (freshly initialised, it predicts one class for every input)."""
    torch.manual_seed(0)
    net = build_cmal(num_classes, abn="pure", **TINY_NET)
    for m in net.modules():
        if hasattr(m, "running_mean"):
            m.momentum = 1.0
    with torch.no_grad():
        net.train()(torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(100)))
    return net.eval()


def _ranks(logits):
    """Each sample's classes, best first."""
    return logits.argsort(1, descending=True)


def test_top5_ranks_the_combined_score():
    net, classes = _tiny(8), 8
    x = torch.randn(14, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    concat, com2, com, _ = spec_scores(net, x)
    # Targets ranked 1st to 7th by the combined score: top-5 holds exactly those ranked 1-5.
    rank = torch.arange(14) % 7
    targets = _ranks(com)[torch.arange(14), rank]
    loader = [(x[:5], targets[:5], 0), (x[5:], targets[5:], 0)]
    got = evaluate(net, loader, nn.CrossEntropyLoss(), num_classes=classes)
    expected = 100.0 * (rank < 5).sum().item() / 14

    def top5(logits):
        return 100.0 * (_ranks(logits)[:, :5] == targets[:, None]).any(1).sum().item() / 14
    assert top5(com) == pytest.approx(expected)
    assert expected not in (top5(concat), top5(com2), 100.0 * (rank < 3).sum().item() / 14)
    assert got["acc_top5_combined"] == pytest.approx(expected)
    # Rows: the true class; columns: the class the combined score predicts.
    counts = torch.zeros(classes, classes, dtype=torch.long)
    for t, p in zip(targets, com.argmax(1)):
        counts[t, p] += 1
    assert got["confusion"] == counts.tolist()
    assert got["confusion"] != counts.T.tolist()


def test_flip_scores_the_image_and_its_mirror_together():
    net = _tiny(8)
    x = torch.randn(12, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    com = spec_scores(net, x)[2]
    mirrored = spec_scores(net, x.flip(3))[2]  # left-right: the last axis
    together, alone = (com + mirrored).argmax(1), mirrored.argmax(1)
    assert (together != alone).any() and (together != com.argmax(1)).any()
    # Half the targets are what the two scores together predict, half the mirror alone.
    targets = torch.where(torch.arange(12) % 2 == 0, together, alone)
    got = evaluate(net, [(x, targets, 0)], nn.CrossEntropyLoss(), flip=True)
    expected = 100.0 * (together == targets).sum().item() / 12
    assert expected != 100.0 * (alone == targets).sum().item() / 12
    assert got["acc_combined_flip"] == pytest.approx(expected)
    assert got["acc_combined"] == pytest.approx(100.0 * (com.argmax(1) == targets).sum().item() / 12)


def test_per_class_rows_count_each_true_class():
    confusion = [[3, 1, 0], [0, 0, 2], [4, 0, 0]]  # rows: true class
    rows = per_class_rows(["a", "b", "c"], confusion)
    assert rows == [("a", 4, 3, 75.0), ("b", 2, 0, 0.0), ("c", 4, 0, 0.0)]


def test_test_only_prints_what_the_spec_scores(tmp_path, capsys):
    """--test_only --tta_flip on a six-class run: the printed accuracies, top-5 and flip scores,
    and the per-class report, against the checkpoint scored here by hand."""
    data = make_image_folder(tmp_path / "data", classes=6, train=4, test=2)
    out = tmp_path / "run"
    assert train.main({"data_path": str(data), "output_dir": str(out)},
                      TINY_ARGS + ["--epochs=1"]) == 0
    capsys.readouterr()
    assert train.main({"data_path": str(data), "output_dir": str(out)},
                      TINY_ARGS + ["--test_only", f"--resume={out / 'last.pt'}", "--tta_flip"]) == 0
    printed = capsys.readouterr().out
    net = load_trained(out / "last.pt")[0]
    test_tf = spec_transforms(32, 36, 2)[1]
    files = sorted((data / "test").glob("*/*.jpg"))
    x = torch.stack([test_tf(load_rgb(f)) for f in files])
    y = torch.tensor([int(f.parent.name.split("_")[1]) for f in files])
    concat, com2, com, _ = spec_scores(net, x)
    mirrored = spec_scores(net, x.flip(3))[2]

    def acc(hit):
        return 100.0 * hit.sum().item() / len(y)
    loss = F.cross_entropy(concat, y).item()
    assert (f"test concat {acc(concat.argmax(1) == y):.2f}% com2 {acc(com2.argmax(1) == y):.2f}% "
            f"combined {acc(com.argmax(1) == y):.2f}% loss {loss:.4f} on 12 images") in printed
    top5 = acc((_ranks(com)[:, :5] == y[:, None]).any(1))
    per_class = [100.0 * ((com.argmax(1) == y) & (y == c)).sum().item() / 2 for c in range(6)]
    assert (f"top-5 (combined) {top5:.2f}%, mean per-class (combined) "
            f"{sum(per_class) / 6:.2f}%, combined with mirror images "
            f"{acc((com + mirrored).argmax(1) == y):.2f}%") in printed
    rows = list(csv.DictReader((out / "last_evaluation" / "per_class.csv").open()))
    assert [(r["class"], int(r["images"]), float(r["accuracy"])) for r in rows] == \
        [(f"class_{c}", 2, per_class[c]) for c in range(6)]


# ---- the transforms ------------------------------------------------------------------------------
@pytest.mark.parametrize("sizes", [(368, 421, 8), (32, 36, 2)])
def test_transforms_are_the_references(sizes):
    """The same tensors as the spec's transforms, seed for seed, on an image that is neither
    square nor symmetric: the same operations, sizes, padding, flip probability and random
    draws."""
    a = np.random.default_rng(0).integers(0, 256, (37, 53, 3)).astype(np.uint8)
    image = Image.fromarray(a)
    ours, spec = build_transforms(*sizes), spec_transforms(*sizes)
    for seed in range(12):
        torch.manual_seed(seed)
        got = ours[0](image)
        torch.manual_seed(seed)
        assert torch.equal(got, spec[0](image)), seed
    assert got.shape == (3, sizes[0], sizes[0])
    assert torch.equal(ours[1](image), spec[1](image))


def test_the_training_flip_is_horizontal_with_probability_one_half():
    """Over many seeds about half the crops are mirrored, left to right."""
    ramp = np.tile(np.linspace(0, 255, 36).astype(np.uint8), (36, 1))  # brighter to the right
    image = Image.fromarray(np.stack([ramp] * 3, -1))
    train_tf = build_transforms(32, 36, 0)[0]
    mirrored = 0
    for seed in range(200):
        torch.manual_seed(seed)
        x = train_tf(image)[0]
        assert torch.equal(x[0], x[-1])  # columns move, rows do not
        mirrored += bool(x[:, 0].mean() > x[:, -1].mean())
    assert 70 <= mirrored <= 130


def test_defaults_are_the_references():
    cfg = settings.parse({"data_path": "d"}, [])
    assert (cfg.epochs, cfg.batch_size, cfg.test_batch_size, cfg.workers) == (200, 16, 3, 4)
    assert (cfg.image_size, cfg.resize, cfg.crop_padding) == (368, 421, 8)
    assert (cfg.lr, cfg.backbone_lr, cfg.momentum, cfg.weight_decay) == (0.002, 0.0002, 0.9, 5e-4)


# ---- the loaders: order, augmentation, seeds, the last partial batch ------------------------------
def _coded_folder(root, train=13, test=5):
    """Two classes of images whose red value names the file (20 + 4 k), with a green ramp."""
    files, k = {}, 0
    for split, count in (("train", train), ("test", test)):
        for c in range(2):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                a = np.zeros((32, 32, 3), np.uint8)
                a[..., 0] = 20 + 4 * k
                a[..., 1] = np.linspace(20, 220, 32).astype(np.uint8)
                a[..., 2] = 100
                Image.fromarray(a).save(folder / f"{i}.png")
                files[k] = (split, c, folder / f"{i}.png")
                k += 1
    return files


def _file_ids(inputs):
    red = (inputs[:, 0, 16, 16] * 0.5 + 0.5) * 255  # the centre is never padding
    return [round((v - 20) / 4) for v in red.tolist()]


def _loaders(root, seed):
    cfg = settings.parse({"data_path": str(root)},
                         ["--image_size=32", "--resize=32", "--crop_padding=2", "--batch_size=4",
                          "--test_batch_size=3", "--workers=0", f"--seed={seed}"])
    return build_loaders(cfg)


def _epoch(loaders, epoch):
    """[(file ids, targets, inputs)] of each training batch of `epoch`."""
    loaders.train.sampler.set_epoch(epoch)
    return [(_file_ids(x), y.tolist(), x) for x, y, _ in loaders.train]


def _augmented(batches):
    return {i: x[j] for ids, _, x in batches for j, i in enumerate(ids)}


def _geometry(x):
    """(mirrored, rows, columns of shift) of an augmented coded image: the padding is the only
    black, and the green ramp rises to the right unless mirrored."""
    mirrored = bool(x[1, 16, 8] > x[1, 16, 24])
    if mirrored:
        x = x.flip(2)
    black = (x == -1).all(0)

    def shift(lines):  # 2 when centred; the crop's offset into the padded image
        lines = lines.tolist()
        top = next(i for i, b in enumerate(lines) if not b)
        bottom = next(i for i, b in enumerate(reversed(lines)) if not b)
        return 2 - top if top else 2 + bottom
    return mirrored, shift(black.all(1)), shift(black.all(0))


def test_training_batches_depend_on_the_seed_and_the_epoch(tmp_path):
    files = _coded_folder(tmp_path)
    runs = {(seed, epoch): _epoch(_loaders(tmp_path, seed), epoch)
            for seed in (0, 1) for epoch in (0, 1)}
    for batches in runs.values():
        # 26 images: six full batches of 4; the partial batch of 2 is not drawn.
        assert [len(ids) for ids, _, _ in batches] == [4] * 6
        ids = [i for b, _, _ in batches for i in b]
        assert len(set(ids)) == 24 and all(files[i][0] == "train" for i in ids)
        assert [t for _, y, _ in batches for t in y] == [files[i][1] for i in ids]
    order = {key: [i for b, _, _ in batches for i in b] for key, batches in runs.items()}
    assert order[0, 0] != order[0, 1] and order[0, 0] != order[1, 0]
    # The same seed and epoch give the same batches, augmentation included.
    again = _epoch(_loaders(tmp_path, 0), 0)
    assert [ids for ids, _, _ in again] == [ids for ids, _, _ in runs[0, 0]]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(again, runs[0, 0]))
    # Each image's crop and flip, and the crops and flips drawn in turn, change with the seed
    # and with the epoch.
    geometry = {key: [_geometry(x) for _, _, xs in batches for x in xs]
                for key, batches in runs.items()}
    for other in ((1, 0), (0, 1)):
        a, b = _augmented(runs[0, 0]), _augmented(runs[other])
        same = sum(torch.equal(a[i], b[i]) for i in a.keys() & b.keys())
        assert same <= len(a.keys() & b.keys()) // 3, other
        same = sum(g == h for g, h in zip(geometry[0, 0], geometry[other]))
        assert same <= 24 // 3, other
    # The spec's RandomCrop(padding) and RandomHorizontalFlip, seen in the batches.
    drawn = [g for gs in geometry.values() for g in gs]
    assert {dy for _, dy, _ in drawn} == {dx for _, _, dx in drawn} == set(range(5))
    assert 0.3 < sum(m for m, _, _ in drawn) / len(drawn) < 0.7


def test_evaluation_batches_are_every_image_once_in_order_unaugmented(tmp_path):
    files = _coded_folder(tmp_path)
    test = _loaders(tmp_path, 0).test
    batches = list(test)
    assert [len(y) for _, y, _ in batches] == [3, 3, 3, 1]  # the last partial batch counts
    ids = [i for x, _, _ in batches for i in _file_ids(x)]
    assert ids == sorted(k for k, f in files.items() if f[0] == "test")
    test_tf = spec_transforms(32, 32, 2)[1]
    x = torch.cat([x for x, _, _ in batches])
    assert torch.equal(x, torch.stack([test_tf(load_rgb(files[i][2])) for i in ids]))


# ---- the validation hold-out: how many images per class -------------------------------------------
# Per fraction, the images held out of classes of 2, 3, 7, 8 and 20 images: round(fraction * n),
# at least one, and at least one left to train on.
HELD = {0.1: [1, 1, 1, 1, 2], 0.3: [1, 1, 2, 2, 6], 0.35: [1, 1, 2, 3, 7], 0.9: [1, 2, 6, 7, 18]}


@pytest.mark.parametrize("fraction", HELD)
def test_hold_out_counts_per_class(fraction):
    sizes = [2, 3, 7, 8, 20]
    # Classes interleaved, so that the split must go by label, not by position.
    samples = [(f"c{c}/{i}.jpg", c) for i in range(20) for c, n in enumerate(sizes) if i < n]
    for seed in (0, 1, 7):
        kept, held = hold_out(samples, fraction, seed)
        assert sorted(kept + held) == sorted(samples) and not set(kept) & set(held)
        assert [sum(t == c for _, t in held) for c in range(5)] == HELD[fraction], seed
