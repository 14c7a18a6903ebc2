"""Attention localisation (cmal/localisation.py): the metric on hand-made maps with known boxes,
the annotated boxes through the test transform, the demo's recorded mark boxes, and what runs
and --test_only report with and without a boxes file."""
import json
import math

import numpy as np
import pytest
import torch

from cmal import localisation as loc
from cmal import train
from cmal.datasets.boxes import BOXES_FILE, read_boxes, write_boxes
from conftest import TINY_ARGS, make_image_folder

SIZE = (32, 32)


def _map_with_block(rows, cols, batch=1):
    """(batch, 32, 32) maps: 1 on rows x cols, 0 elsewhere."""
    m = torch.zeros(batch, *SIZE)
    m[:, rows[0]:rows[1], cols[0]:cols[1]] = 1.0
    return m


def _figures(maps, parts):
    sums = loc.batch_sums([maps] * 3, torch.tensor(parts, dtype=torch.float32), SIZE,
                          loc.chance_generator())
    return loc.summarise(sums.tolist())


def test_crop_box_of_a_block_is_the_padded_block():
    # rows 10..19 and cols 4..11 at or above theta; padding 0.1 x 32 = 3.2, truncated as the
    # reference: top int(10 - 3.2) = 6, bottom int(19 + 3.2) = 22, left 0, right int(11 + 3.2) = 14
    boxes = loc.crop_boxes([_map_with_block((10, 20), (4, 12))] * 3, SIZE)
    for box in boxes:
        assert box.tolist() == [[6, 22, 0, 14]]


def test_a_box_that_contains_the_part_centre():
    part = [5.0, 12.0, 9.0, 16.0]  # x0, y0, x1, y1: centre (7, 14), inside rows 6-22, cols 0-14
    result = _figures(_map_with_block((10, 20), (4, 12)), [part])
    assert result["images"] == 1
    for crop in loc.CROPS:
        assert result[crop]["pointing"] == 100.0
        assert result[crop]["iou"] == pytest.approx(16 / (16 * 14))
        assert result[crop]["area"] == pytest.approx(16 * 14 / 1024)
        assert result[crop]["whole"] == 0.0


def test_a_box_that_misses_the_part():
    part = [20.0, 20.0, 30.0, 30.0]  # centre (25, 25); no overlap with cols 0-14
    result = _figures(_map_with_block((10, 20), (4, 12)), [part])
    for crop in loc.CROPS:
        assert result[crop]["pointing"] == 0.0
        assert result[crop]["iou"] == 0.0


def test_a_partial_overlap_that_misses_the_centre():
    part = [10.0, 0.0, 20.0, 10.0]  # centre (15, 5): outside cols 0-14 and rows 6-22
    result = _figures(_map_with_block((10, 20), (4, 12)), [part])
    inter = (14 - 10) * (10 - 6)
    assert result["joint"]["pointing"] == 0.0
    assert result["joint"]["iou"] == pytest.approx(inter / (16 * 14 + 100 - inter))


def test_a_degenerate_map_crops_the_whole_image():
    # A constant map normalises to zeros: no pixel at theta, so the crop is the whole image.
    part = [4.0, 4.0, 12.0, 8.0]
    for maps in (torch.full((1, *SIZE), 3.0), torch.full((1, *SIZE), float("nan"))):
        result = _figures(maps, [part])
        for crop in loc.CROPS:
            assert result[crop] == {"pointing": 100.0, "iou": pytest.approx(32 / 1024),
                                    "area": 1.0, "whole": 100.0}


def test_images_without_a_box_are_left_out_and_none_at_all_is_no_result():
    maps = _map_with_block((10, 20), (4, 12), batch=2)
    nan = [math.nan] * 4
    result = _figures(maps, [[5.0, 12.0, 9.0, 16.0], nan])
    assert result["images"] == 1 and result["joint"]["pointing"] == 100.0
    assert _figures(maps, [nan, nan]) is None


def test_chance_is_a_random_box_of_the_same_size():
    # A 16 x 14 box placed at random over 17 x 19 positions contains a centre at (7, 14) with a
    # probability of (rows holding 14: tops 0..14 of 0..16) x (cols holding 7: lefts 0..7 of
    # 0..18) = 15/17 x 8/19.
    part = [[5.0, 12.0, 9.0, 16.0]] * 512
    result = _figures(_map_with_block((10, 20), (4, 12), batch=512), part)
    expected = 100 * 15 / 17 * 8 / 19
    assert result["chance"]["joint"]["pointing"] == pytest.approx(expected, abs=2.0)
    assert 0 < result["chance"]["joint"]["iou"] < result["joint"]["iou"]
    # The same placements at every evaluation.
    assert _figures(_map_with_block((10, 20), (4, 12), batch=512), part) == result


def test_box_through_the_test_transform():
    # A 200 x 100 image resized to 40 x 40, centre crop 32 (offset 4): x scales by 0.2, y by 0.4.
    assert loc.box_in_crop((50, 25, 100, 50), 200, 100, 40, 32) == (6.0, 6.0, 16.0, 16.0)
    # Clipped to the crop; nothing left or no box: NaNs.
    assert loc.box_in_crop((0, 0, 200, 100), 200, 100, 40, 32) == (0.0, 0.0, 32.0, 32.0)
    assert all(math.isnan(v) for v in loc.box_in_crop((0, 0, 10, 5), 200, 100, 40, 32))
    assert all(math.isnan(v) for v in loc.box_in_crop(None, 200, 100, 40, 32))


# ---- the demo's recorded mark boxes ----------------------------------------------------------
@pytest.mark.parametrize("variant", ["default", "fine"])
def test_recorded_boxes_bound_the_drawn_marks(variant):
    from cmal.tools import demo
    v = demo.VARIANTS[variant]
    for i, kind in enumerate(v.marks):
        seed = 100 + i
        with_mark, box = demo.render(kind, np.random.default_rng(seed), variant=v)
        without, same_box = demo.render(kind, np.random.default_rng(seed), variant=v,
                                        with_mark=False)
        assert box == same_box
        diff = np.abs(np.asarray(with_mark, int) - np.asarray(without, int)).sum(2)
        ys, xs = np.nonzero(diff)
        # The pixels the mark changed span its box exactly (x1, y1 exclusive); a mark pixel of
        # the same colour as what lies under it changes nothing, so allow one pixel inside.
        assert (xs.min(), ys.min()) >= box[:2] and (xs.max() + 1, ys.max() + 1) <= box[2:]
        assert xs.min() - box[0] <= 1 and ys.min() - box[1] <= 1
        assert box[2] - (xs.max() + 1) <= 1 and box[3] - (ys.max() + 1) <= 1


def test_the_demo_writes_every_image_box(tmp_path, monkeypatch):
    from cmal.tools import demo
    small = demo.FINE._replace(train_per_class=2, test_per_class=1)
    root = demo.make_dataset(tmp_path / "fine", variant=small)
    boxes = read_boxes(root / BOXES_FILE)
    images = sorted(p.relative_to(root) for p in root.rglob("*.jpg"))
    assert sorted(boxes) == images and len(images) == 4 * 3
    for box in boxes.values():  # a small mark: 3 to 12 px on a 96 px image
        assert 3 <= box.x1 - box.x0 <= 12 and 3 <= box.y1 - box.y0 <= 12


# ---- runs and --test_only ------------------------------------------------------------------
def _boxed_folder(root):
    """The conftest image folder with a box for every image but one."""
    data = make_image_folder(root)
    files = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.jpg"))
    write_boxes(data / BOXES_FILE, {f: (8, 10, 24, 30) for f in files[1:]})
    return data


def _records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_runs_record_localisation_per_epoch_and_resume_keeps_it(tmp_path, monkeypatch, capsys):
    data = _boxed_folder(tmp_path / "data")
    out = tmp_path / "run"
    given = {"data_path": str(data), "num_classes": 3, "output_dir": str(out)}
    args = TINY_ARGS + ["--eval_every=1"]
    assert train.main(given, args + ["--epochs=1"]) == 0
    first = _records(out)[0]["test"]["localisation"]
    assert first["images"] == 9 - 1  # 3 classes x 3 test images, one without a box
    assert set(first) == {"images", "chance", *loc.CROPS}
    for crop in loc.CROPS:
        assert 0 <= first[crop]["pointing"] <= 100 and 0 < first[crop]["area"] <= 1
    assert "part in crop " in capsys.readouterr().out
    # Resumed for a second epoch: the first epoch's figures stay as they were.
    assert train.main(given, args + ["--epochs=2", "--resume", "--extend"]) == 0
    records = _records(out)
    assert len(records) == 2 and records[0]["test"]["localisation"] == first
    assert records[1]["test"]["localisation"]["images"] == 8
    capsys.readouterr()
    assert train.main(given, args + ["--test_only", f"--resume={out / 'last.pt'}",
                                     "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "localisation on 8 annotated images, pointing/IoU/area: expert1 " in printed
    assert "(chance " in printed


def test_no_boxes_no_localisation(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data")
    out = tmp_path / "run"
    given = {"data_path": str(data), "num_classes": 3, "output_dir": str(out)}
    assert train.main(given, TINY_ARGS + ["--epochs=1", "--eval_every=1"]) == 0
    assert "localisation" not in _records(out)[0]["test"]
    assert "part in crop" not in capsys.readouterr().out
    assert train.main(given, TINY_ARGS + ["--test_only", f"--resume={out / 'last.pt'}"]) == 0
    assert "localisation on" not in capsys.readouterr().out


def test_the_baseline_has_no_attention_to_localise(tmp_path):
    data = _boxed_folder(tmp_path / "data")
    out = tmp_path / "run"
    given = {"data_path": str(data), "num_classes": 3, "output_dir": str(out)}
    assert train.main(given, TINY_ARGS + ["--epochs=1", "--method=baseline"]) == 0
    assert "localisation" not in _records(out)[0]["test"]


def test_compare_at_equal_steps_tables_the_localisation(tmp_path, capsys):
    from cmal.tools import demo
    data = _boxed_folder(tmp_path / "data")
    assert demo.main(["--compare", f"--compare_dir={tmp_path / 'cmp'}", f"--data_path={data}",
                      "--num_classes=3", *TINY_ARGS, "--methods=no_joint_crop,baseline",
                      "--seeds=0", "--epochs=1", "--equal_steps"]) == 0
    printed = capsys.readouterr().out
    assert ("equal optimizer steps: CMAL-Net, no joint-crop step 4 per batch x 1 epochs, "
            "baseline (one head) 1 per batch x 5 epochs") in printed
    assert len(_records(tmp_path / "cmp" / "baseline_seed0")) == 5
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| baseline (one head) | 1 | 5 |" in table
    rows = [line for line in table.splitlines() if line.startswith("| CMAL-Net, no joint-crop")]
    assert len(rows) == 1 + len(loc.CROPS)  # accuracy, then one localisation row per crop
    assert "| CMAL-Net, no joint-crop step | joint | " in table
    assert "| baseline (one head) | joint" not in table  # no attention, no localisation
    header = (tmp_path / "cmp" / "runs.csv").read_text().splitlines()[0]
    assert "loc_joint_pointing" in header and "loc_expert1_chance_iou" in header


def test_attention_pictures_draw_the_annotated_box(tmp_path):
    from matplotlib.colors import to_hex
    from cmal.tools import attention
    data = _boxed_folder(tmp_path / "data")
    first, second = sorted((data / "test").rglob("*.jpg"))[:2]
    # 40 x 40 images, resize 36, centre crop 32 (offset 2): (8, 10, 24, 30) -> (5.2, 7, 19.6, 25)
    part = loc.find_part_box(second, 36, 32)
    assert part == pytest.approx((8 * 0.9 - 2, 10 * 0.9 - 2, 24 * 0.9 - 2, 30 * 0.9 - 2))
    image = np.zeros((32, 32, 3))
    heats = [np.zeros((32, 32))] * 3
    box = torch.tensor([0, 16, 0, 16])  # the part's centre (12.4, 16) lies on its exclusive edge
    heads = [torch.zeros(3)] * 4
    fig = attention.draw(second, image, image, heats, [box] * 3, heats[0], box, heads,
                         torch.zeros(3), ["a", "b", "c"], ["4x4"] * 3, part=part)
    dashed = [p for ax in fig.axes for p in ax.patches
              if to_hex(p.get_edgecolor()) == attention.PART_COLOR]
    assert len(dashed) == 5  # the input, the joint box's panel and the three experts'
    titles = " ".join(" ".join(ax.get_title().split()) for ax in fig.axes)
    assert titles.count("part centre outside box") == 4
    box = torch.tensor([0, 17, 0, 16])
    fig = attention.draw(second, image, image, heats, [box] * 3, heats[0], box, heads,
                         torch.zeros(3), ["a", "b", "c"], ["4x4"] * 3, part=part)
    titles = " ".join(" ".join(ax.get_title().split()) for ax in fig.axes)
    assert titles.count("part centre in box") == 4
    # An image of the folder without a box (the first one) is drawn as before.
    assert loc.find_part_box(first, 36, 32) is None


def test_the_oracle_crop_holds_the_mark_and_stays_inside_the_image(tmp_path):
    from PIL import Image
    from cmal.datasets.boxes import Box
    from cmal.tools import demo, demo_oracle
    assert demo_oracle.oracle_square(Box(2, 3, 10, 9), 96, 96) == (0, 0, 24, 24)  # clamped
    assert demo_oracle.oracle_square(Box(40, 40, 50, 48), 96, 96) == (30, 29, 60, 59)
    small = demo.FINE._replace(train_per_class=1, test_per_class=1)
    root = demo.make_dataset(tmp_path / "fine", variant=small)
    demo_oracle.make_oracle(root, tmp_path / "oracle")
    for key, box in read_boxes(root / BOXES_FILE).items():
        x0, y0, x1, y1 = demo_oracle.oracle_square(box, 96, 96)
        assert x0 <= box.x0 and y0 <= box.y0 and box.x1 <= x1 and box.y1 <= y1
        assert Image.open(tmp_path / "oracle" / key).size == (96, 96)
