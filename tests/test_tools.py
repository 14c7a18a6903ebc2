"""The tools on a trained model: cmal.tools.predict, attention, plot_curves (one tiny run shared)."""
import csv
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from cmal.tools import attention
from cmal.inference import load_trained
from cmal import engine
from cmal.tools import plot_curves
from cmal.tools import predict
from cmal.data import build_transforms
from cmal.images import load_rgb
from cmal.scores import combined_scores
from cmal.utils import highlight_im

CLASSES = ["class_0", "class_1", "class_2"]


@pytest.fixture(scope="module")
def data_dir(run_dir):
    return run_dir.parent / "data"


def images_of(data_dir):
    return sorted((data_dir / "test").rglob("*.jpg"))


def parse_printed(text):
    """{path: [(rank, class, score), ...]} from predict's output."""
    result, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (\d+)\. (\S+) +([0-9.]+)$", line)
        if m:
            result[current].append((int(m[1]), m[2], float(m[3])))
        else:
            current = line
            result[current] = []
    return result


def read_csv(path):
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "rank", "class", "score"]
    return rows[1:]


def direct_combined(checkpoint, paths):
    """Combined logits computed here from the pieces, as engine.evaluate does."""
    model, classes, cfg = load_trained(checkpoint, "cpu")
    tf = build_transforms(cfg.image_size, cfg.resize, cfg.crop_padding)[1]
    x = torch.stack([tf(load_rgb(p)) for p in paths])
    with torch.no_grad():
        out = model(x)
        a1, a2, a3 = engine.attention_maps(model, out)
        out_att = model(highlight_im(x, a1, a2, a3))
    return classes, sum(out[:4]) + sum(out_att[:4])


def test_predict_top_k_and_csv_match_the_combined_score(run_dir, data_dir, tmp_path, capsys):
    ckpt = run_dir / "best.pt"
    table = tmp_path / "pred.csv"
    assert predict.main([str(ckpt), str(data_dir / "test"), "--topk=2", f"--csv={table}",
                         "--batch_size=4", "--device=cpu"]) == 0
    printed = parse_printed(capsys.readouterr().out)
    paths = images_of(data_dir)
    assert list(printed) == [str(p) for p in paths]  # recursive, sorted, 9 images
    rows = read_csv(table)
    assert len(rows) == 2 * len(paths)
    classes, com = direct_combined(ckpt, paths)
    assert classes == CLASSES
    probs = torch.softmax(com, 1)
    for i, path in enumerate(paths):
        ranked = printed[str(path)]
        assert [r for r, _, _ in ranked] == [1, 2]
        mine = [r for r in rows if r[0] == str(path)]
        assert [int(r[1]) for r in mine] == [1, 2]
        scores = [float(r[3]) for r in mine]
        assert all(0.0 <= s <= 1.0 for s in scores) and sum(scores) <= 1.0 + 1e-5
        assert scores[0] >= scores[1]
        assert all(r[2] in classes for r in mine)
        assert [c for _, c, _ in ranked] == [r[2] for r in mine]
        # Top-1 is the argmax of the combined logits, and the score its softmax.
        assert mine[0][2] == classes[int(com[i].argmax())]
        assert scores[0] == pytest.approx(float(probs[i].max()), abs=1e-5)
        assert ranked[0][2] == pytest.approx(scores[0], abs=1e-4)


def test_predict_batches_give_the_same_result_as_single_images(run_dir, data_dir, tmp_path,
                                                               capsys):
    results = {}
    for batch in (1, 4):  # 9 images: batches of 4, 4 and 1
        table = tmp_path / f"b{batch}.csv"
        assert predict.main([str(run_dir / "last.pt"), str(data_dir / "test"), "--topk=3",
                             f"--csv={table}", f"--batch_size={batch}", "--device=cpu"]) == 0
        results[batch] = read_csv(table)
    assert [r[:3] for r in results[1]] == [r[:3] for r in results[4]]
    for a, b in zip(results[1], results[4]):
        assert float(a[3]) == pytest.approx(float(b[3]), abs=1e-5)
    # k = every class: the scores of an image sum to 1.
    for i in range(0, len(results[1]), 3):
        assert sum(float(r[3]) for r in results[1][i:i + 3]) == pytest.approx(1.0, abs=1e-4)


def test_combined_scores_equal_the_evaluation_formula(run_dir, data_dir):
    paths = images_of(data_dir)[:4]
    _, com = direct_combined(run_dir / "last.pt", paths)
    model, _, cfg = load_trained(run_dir / "last.pt")
    tf = build_transforms(cfg.image_size, cfg.resize, cfg.crop_padding)[1]
    s = combined_scores(model, torch.stack([tf(load_rgb(p)) for p in paths]))
    torch.testing.assert_close(s.com, com)
    torch.testing.assert_close(s.com2, sum(s.heads))


def test_topk_above_the_class_count_is_clamped(run_dir, data_dir, capsys):
    image = images_of(data_dir)[0]
    assert predict.main([str(run_dir / "last.pt"), str(image), "--topk=10", "--device=cpu"]) == 0
    printed = parse_printed(capsys.readouterr().out)
    assert len(printed[str(image)]) == 3


def assert_png(path, min_w=400, min_h=300):
    with Image.open(path) as img:
        assert img.format == "PNG"
        w, h = img.size
        img.verify()
    assert w >= min_w and h >= min_h, (w, h)
    assert w <= 4000 and h <= 4000, (w, h)


def test_attention_pictures(run_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "att"
    assert attention.main([str(run_dir / "best.pt"), str(data_dir / "test"), f"--out={out}",
                           "--max_images=3", "--device=cpu"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 3
    # Same file names in different class folders get distinct pictures.
    assert len(set(printed)) == 3 and sorted(printed) == sorted(str(p) for p in out.iterdir())
    assert all("__" in Path(p).name for p in printed)
    # Spread over the sorted list: the first and the last image are included.
    assert Path(printed[0]).name == "class_0__0.png" and Path(printed[-1]).name == "class_2__2.png"
    for p in printed:
        assert_png(p)
    # A single image is named after its file.
    image = images_of(data_dir)[0]
    assert attention.main([str(run_dir / "best.pt"), str(image), f"--out={tmp_path / 'one'}",
                           "--device=cpu"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "one" / "0.png")
    assert_png(tmp_path / "one" / "0.png")


def test_spread_and_names():
    items = list(range(10))
    assert attention.spread(items, 0) == items
    assert attention.spread(items, 3) == [0, 4, 9]
    assert attention.spread(items, 1) == [0]
    assert attention.spread(items, 20) == items


def test_plot_curves(run_dir, tmp_path, capsys):
    records = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all("test" in r for r in records)
    out = tmp_path / "curves.png"
    assert plot_curves.main([str(run_dir), f"--out={out}"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert_png(out, 800, 300)
    out2 = tmp_path / "sub" / "c.png"
    assert plot_curves.main([str(run_dir / "log.jsonl"), f"--out={out2}"]) == 0
    assert_png(out2, 800, 300)


def test_plot_curves_errors(tmp_path, capsys):
    assert plot_curves.main([str(tmp_path), f"--out={tmp_path / 'c.png'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path) in err and "log.jsonl" in err
    assert len(err.strip().splitlines()) == 1
    (tmp_path / "log.jsonl").write_text("")
    assert plot_curves.main([str(tmp_path), f"--out={tmp_path / 'c.png'}"]) == 2
    err = capsys.readouterr().err
    assert "empty" in err and str(tmp_path / "log.jsonl") in err
    (tmp_path / "log.jsonl").write_text("not json\n")
    assert plot_curves.main([str(tmp_path / "log.jsonl")]) == 2
    assert "line 1" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


@pytest.mark.parametrize("tool", [predict, attention])
def test_errors_name_the_file(tool, run_dir, data_dir, tmp_path, capsys):
    image = str(images_of(data_dir)[0])
    # Options first: a later --out in `args` wins (argparse keeps the last value).
    extra = ["--device=cpu"] + ([f"--out={tmp_path / 'o'}"] if tool is attention else [])

    def check(args, *expected):
        assert tool.main(extra + args) == 2, args
        out = capsys.readouterr()
        assert out.err.startswith("error: ") and len(out.err.strip().splitlines()) == 1, out.err
        for text in expected:
            assert text in out.err, (text, out.err)

    check([str(tmp_path / "missing.pt"), image], str(tmp_path / "missing.pt"), "does not exist")
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not a checkpoint")
    check([str(tmp_path / "broken.pt"), image], str(tmp_path / "broken.pt"), "corrupt")
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    check([str(tmp_path / "foreign.pt"), image], str(tmp_path / "foreign.pt"),
          "not a CMAL-Net training checkpoint")
    ckpt = str(run_dir / "last.pt")
    check([ckpt, str(tmp_path / "nope.jpg")], str(tmp_path / "nope.jpg"), "does not exist")
    (tmp_path / "empty").mkdir()
    check([ckpt, str(tmp_path / "empty")], str(tmp_path / "empty"), "no image files")
    bad = tmp_path / "imgs" / "bad.jpg"
    bad.parent.mkdir()
    bad.write_bytes(b"\xff\xd8 truncated")
    check([ckpt, str(bad)], str(bad), "not a readable image")
    # With --skip_bad_images the other images are still processed.
    Image.open(image).save(tmp_path / "imgs" / "good.jpg")
    assert tool.main(extra + [ckpt, str(tmp_path / "imgs"), "--skip_bad_images"]) == 0
    out = capsys.readouterr()
    assert str(bad) in out.err and "good" in out.out and "bad.jpg" not in out.out
    if tool is predict:
        check([ckpt, image, f"--csv={tmp_path / 'no' / 'such' / 'dir.csv'}"], "dir.csv")
    else:
        (tmp_path / "file").write_text("")
        check([ckpt, image, f"--out={tmp_path / 'file' / 'x'}"], str(tmp_path / "file"))


@pytest.mark.parametrize("tool, text", [(predict, "evaluation ranks by"),
                                        (attention, "combined"), (plot_curves, "log.jsonl")])
def test_help(tool, text, capsys):
    with pytest.raises(SystemExit) as exc:
        tool.main(["--help"])
    assert exc.value.code == 0
    assert text in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("tool", [predict, attention])
def test_errors_suggest_only_options_the_tool_has(tool, run_dir, data_dir, tmp_path, capsys):
    image = str(images_of(data_dir)[0])  # 40 x 40 pixels
    extra = ["--device=cpu"] + ([f"--out={tmp_path / 'o'}"] if tool is attention else [])
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    own = set(re.findall(r"--\w+", capsys.readouterr().out))
    weights = tmp_path / "weights.pt"  # TResNet weights, say, where a checkpoint belongs
    torch.save({"model": {"body.conv1.weight": torch.zeros(1)}}, weights)
    said = []
    for args, expected in (([str(weights), image], "not a CMAL-Net training checkpoint"),
                           ([str(run_dir), image], f"is a folder; pass a checkpoint file, such "
                                                   f"as {run_dir / 'last.pt'}"),
                           ([str(run_dir / "last.pt"), image, "--max_image_pixels=1000"],
                            "1,600 pixels, more than --max_image_pixels=1,000")):
        assert tool.main(extra + args) == 2, args
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
        said += re.findall(r"--\w+", err)
    assert said and set(said) <= own, set(said) - own
    # The option the message names does what it says.
    assert tool.main(extra + [str(run_dir / "last.pt"), image, "--max_image_pixels=1600",
                              "--overwrite"]) == 0


def test_an_output_that_is_a_folder_is_not_offered_overwrite(run_dir, data_dir, tmp_path, capsys):
    image = str(images_of(data_dir)[0])
    for overwrite in ([], ["--overwrite"]):
        assert predict.main([str(run_dir / "last.pt"), image, f"--csv={tmp_path}",
                             "--device=cpu", *overwrite]) == 2
        err = capsys.readouterr().err
        assert f"{tmp_path} (from --csv) is a folder" in err and "choose another --csv" in err
        assert "pass --overwrite" not in err
