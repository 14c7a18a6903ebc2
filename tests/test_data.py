"""Bad and unusual data: every case works, or stops naming the file and the fix, or is skipped
with a warning and counted when the user asks for that."""
import json
import struct
from contextlib import nullcontext
import zlib

import numpy as np
import pytest
from PIL import Image

from cmal.tools import check_data
from cmal import train
from cmal.data import EpochSampler, build_transforms
from cmal.folders import DatasetError, check_layout
from cmal.images import BadImageError, load_rgb
from tests.conftest import TINY_ARGS, make_image_folder


def _png_header_only(path, width, height):
    """A PNG that announces width x height pixels and holds almost nothing: a decompression bomb
    as far as the header goes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) +
                     chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


# ---- layout --------------------------------------------------------------------------------
def test_layout_errors_name_the_folder_and_the_fix(tmp_path):
    with pytest.raises(DatasetError, match=r"data path .*missing does not exist.*--data_path"):
        check_layout(tmp_path / "missing")
    (tmp_path / "d" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"has no 'test' folder: expected .*/train/<class>"):
        check_layout(tmp_path / "d")
    root = make_image_folder(tmp_path / "e", classes=3)
    (root / "test" / "class_2").rename(root / "test" / "class_x")
    with pytest.raises(DatasetError, match=r"only in train: class_2; only in test: class_x"):
        check_layout(root)


def test_empty_class_folder(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2)
    (root / "train" / "empty").mkdir()
    (root / "test" / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"train has class folders with no image files: empty"):
        check_layout(root)


def test_class_count_must_match_the_setting(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2)
    with pytest.raises(DatasetError, match="has 2 class folders but num_classes is 5.*--num_classes=2"):
        check_layout(root, num_classes=5)


def test_non_image_files_are_ignored_with_a_warning(tmp_path):
    root = make_image_folder(tmp_path / "d", classes=2)
    (root / "train" / "class_0" / "notes.txt").write_text("hello")
    (root / "train" / "class_0" / ".DS_Store").write_bytes(b"\0")
    with pytest.warns(UserWarning, match="1 files .* are not images and are ignored"):
        classes, samples = check_layout(root)
    assert not any(p.endswith((".txt", ".DS_Store")) for p, _ in samples["train"])


# ---- single files --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "LA", "I;16", "I", "F", "1"])
def test_colour_modes_load_as_rgb(tmp_path, mode):
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :15] = (200, 40, 10)
    base = Image.fromarray(rgb)
    if mode == "I;16":
        img = Image.fromarray((np.linspace(0, 65535, 600).reshape(20, 30)).astype(np.uint16))
    elif mode == "P":
        img = base.convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        img = base.convert(mode)
    ext = {"CMYK": "jpg", "F": "tiff", "I": "tiff"}.get(mode, "png")
    path = tmp_path / f"img.{ext}"
    img.save(path)
    out = load_rgb(path)
    assert out.mode == "RGB" and out.size == (30, 20)
    a = np.asarray(out).astype(int)
    if mode == "I;16":  # scaled to 8 bits, not clipped to white
        assert a[0, 0, 0] == 0 and a[-1, -1, 0] == 255 and 100 < a[10, 15, 0] < 160
    elif mode in ("RGBA", "P", "CMYK"):
        assert abs(a[5, 5] - [200, 40, 10]).max() <= 12 and abs(a[5, 25]).max() <= 12


def test_transparent_pixels_become_white(tmp_path):
    a = np.zeros((8, 8, 4), np.uint8)
    a[:, :4] = (255, 0, 0, 255)
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    out = np.asarray(load_rgb(tmp_path / "t.png"))
    assert (out[0, 0] == [255, 0, 0]).all() and (out[0, 7] == [255, 255, 255]).all()


def test_truncated_jpeg_names_the_file(tmp_path):
    path = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:600])
    with pytest.raises(BadImageError, match=r"(?i)cut\.jpg: not a readable image .*truncated"):
        load_rgb(path)


def test_text_file_with_a_jpg_name(tmp_path):
    path = tmp_path / "fake.jpg"
    path.write_text("<html>404 not found</html>")
    with pytest.raises(BadImageError, match=r"fake\.jpg: not a readable image"):
        load_rgb(path)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    _png_header_only(path, 200_000, 200_000)
    with pytest.raises(BadImageError, match=r"bomb\.png: 40,000,000,000 pixels, more than "
                                            r"--max_image_pixels=89,478,485 .*raise"):
        load_rgb(path)
    # Between the limit and twice it PIL warns instead of failing: the same message.
    _png_header_only(path, 10_000, 10_000)
    with pytest.raises(BadImageError, match=r"100,000,000 pixels, more than "
                                            r"--max_image_pixels=60,000,000 "):
        load_rgb(path, max_pixels=60_000_000)


def test_images_smaller_than_the_crop_are_upsampled(tmp_path):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (7, 5), (10, 200, 30)).save(path)
    train_tf, test_tf = build_transforms(368, 421, 8)
    assert train_tf(load_rgb(path)).shape == (3, 368, 368)
    assert test_tf(load_rgb(path)).shape == (3, 368, 368)


# ---- sampling ------------------------------------------------------------------------------
def test_sampler_shards_and_resumes():
    full = list(EpochSampler(10, seed=3))
    assert sorted(i for i, _ in full) == list(range(10))
    s = EpochSampler(10, seed=3)
    s.set_epoch(0, start=4)
    assert list(s) == full[4:] and len(s) == 6
    ranks = [list(EpochSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks)  # padded to 12
    assert sorted({i for r in ranks for i, _ in r}) == list(range(10))
    evals = [list(EpochSampler(10, 3, shuffle=False, rank=r, world_size=3, pad=False)) for r in range(3)]
    assert sorted(i for r in evals for i, _ in r) == list(range(10))
    s.set_epoch(1)
    assert [i for i, _ in s] != [i for i, _ in full]


# ---- in training ---------------------------------------------------------------------------
def _run(root, out, *extra):
    return train.main({"data_path": str(root), "num_classes": 3, "output_dir": str(out)},
                      TINY_ARGS + ["--epochs=2"] + list(extra))


def _break_one(root):
    bad = root / "train" / "class_1" / "3.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    return bad


def test_bad_image_stops_training_naming_it(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d")
    bad = _break_one(root)
    assert _run(root, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "--skip_bad_images" in err and "cmal.tools.check_data" in err
    assert not (tmp_path / "out" / "last.pt").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_skipping_bad_images_counts_them(tmp_path, capsys, workers):
    root = make_image_folder(tmp_path / "d")  # 24 train images: 6 full batches of 4
    _break_one(root)
    # Warnings of worker processes stay in those processes.
    with pytest.warns(UserWarning, match="skipping .*3.jpg") if workers == 0 else nullcontext():
        # --check_images=none: the file is met at its batch, not before training.
        assert _run(root, tmp_path / "out", "--skip_bad_images", f"--workers={workers}",
                    "--check_images=none") == 0
    out = capsys.readouterr().out
    assert "1 bad images skipped" in out
    records = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [1, 1]
    assert [r["samples"] for r in records] == [23, 23]


def test_mixed_colour_modes_and_sizes_train(tmp_path):
    root = make_image_folder(tmp_path / "d")
    folder = root / "train" / "class_0"
    Image.new("L", (13, 9), 128).save(folder / "gray.png")
    Image.new("CMYK", (50, 40), (0, 100, 200, 0)).save(folder / "cmyk.jpg")
    Image.new("RGBA", (30, 30), (0, 0, 255, 100)).save(folder / "rgba.png")
    Image.new("P", (30, 30), 3).save(folder / "pal.png")
    Image.fromarray(np.full((30, 30), 40000, np.uint16)).save(folder / "deep.png")
    assert _run(root, tmp_path / "out") == 0
    assert json.loads((tmp_path / "out" / "log.jsonl").read_text().splitlines()[-1])["samples"] == 28


def test_check_data_lists_every_problem(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d")
    bad = _break_one(root)
    (root / "test" / "class_0" / "fake.jpg").write_text("not an image")
    (root / "train" / "class_2" / "readme.txt").write_text("x")
    _png_header_only(root / "test" / "class_1" / "bomb.png", 100_000, 100_000)
    (root / "train" / "empty").mkdir()
    (root / "test" / "empty").mkdir()
    assert check_data.main([str(root), "--workers=2"]) == 1
    out = capsys.readouterr().out
    assert "LAYOUT" in out and "no image files: empty" in out
    assert f"BAD     {bad}" in out and "fake.jpg: not a readable image" in out
    assert "bomb.png: 10,000,000,000 pixels, more than --max_image_pixels" in out
    assert "IGNORED" in out and "readme.txt" in out
    assert "3 unreadable images" in out


def test_check_data_ok(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d")
    assert check_data.main([str(root), "--workers=1", "--image_size=32"]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


# ---- link cycles, names equal but for case, and counts that add up (#18) -----------------------
def test_a_link_cycle_is_skipped_and_listed_not_a_traceback(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d")
    for folder in (root / "train" / "class_0", root / "train"):  # in a class folder, and above
        (folder / "a").symlink_to("b")
        (folder / "b").symlink_to("a")
    assert check_data.main([str(root), "--workers=1", "--image_size=32"]) == 0
    out = capsys.readouterr().out
    for folder in (root / "train" / "class_0", root / "train"):
        for name in "ab":
            assert f"SKIPPED {folder / name}: a link cycle" in out
    assert "4 skipped entries" in out and out.strip().endswith("OK")
    # Training's scan takes the images and warns, naming check_data.
    with pytest.warns(UserWarning, match="4 entries .* are skipped, e.g. .*a link cycle"):
        classes, samples = check_layout(root)
    assert classes == ["class_0", "class_1", "class_2"] and len(samples["train"]) == 24


def test_class_names_equal_but_for_case_are_flagged(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d", classes=2)
    for split in ("train", "test"):
        (root / split / "class_0").rename(root / split / "Class_0")
        (root / split / "CLASS_1").mkdir()
        (root / split / "class_1" / "0.jpg").rename(root / split / "CLASS_1" / "0.jpg")
    assert check_data.main([str(root), "--workers=1", "--image_size=32"]) == 1
    out = capsys.readouterr().out
    assert f"CASE    {root / 'train'} holds class folders whose names differ only in case: " \
           "CLASS_1, class_1;" in out and "case-insensitive filesystem" in out
    assert "Class_0" not in out.split("CASE")[1].split("\n")[0]
    assert not out.strip().endswith("OK")
    with pytest.warns(UserWarning, match="differ only in case: CLASS_1, class_1"):
        check_layout(root)


def test_a_hold_out_too_large_counts_the_images_found(tmp_path, capsys):
    root = make_image_folder(tmp_path / "d")  # 8 train images in each of 3 classes
    assert _run(root, tmp_path / "out", "--val_split=0.9") == 2
    err = capsys.readouterr().err
    assert (f"{root}/train has 24 images, of which --val_split=0.9 holds out 21 for validation: "
            "3 left to train on, fewer than one batch of 4; lower --val_split or --batch_size"
            ) in err


def test_a_split_folder_given_as_the_data_path_points_at_its_parent(tmp_path):
    root = make_image_folder(tmp_path / "d")
    with pytest.raises(DatasetError) as exc:
        check_layout(root / "train")
    assert f"is the 'train' folder of a dataset, not the dataset: pass --data_path={root}" in \
        str(exc.value) and "has no 'test' folder" not in str(exc.value)


def test_a_dataset_one_folder_down_is_named(tmp_path):
    # An archive unpacked into a folder of its own name: data/Food-11/train. The message named
    # only the missing train/ and test/ of data/.
    root = make_image_folder(tmp_path / "data" / "Food-11")
    with pytest.raises(DatasetError) as exc:
        check_layout(tmp_path / "data")
    assert f"its folder Food-11 does: pass --data_path={root}" in str(exc.value)
    assert "has no 'test' folder" not in str(exc.value)
    # Two candidates: no guess.
    make_image_folder(tmp_path / "data" / "Food-12")
    with pytest.raises(DatasetError, match="has no 'train' folder"):
        check_layout(tmp_path / "data")
