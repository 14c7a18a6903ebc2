"""cmal.export and cmal.tools.export: the combined prediction exported with torch.export,
TorchScript and ONNX reproduces engine.combined_scores on the PyTorch model (one tiny run)."""
import json
import warnings

import pytest
import torch
import torchvision.transforms as T

from cmal.inference import load_trained
from cmal import export, train
from cmal.images import load_rgb
from cmal.scores import combined_scores
from cmal import inference
from cmal.tools import export as export_tool
from tests.conftest import TINY_ARGS

CLASSES = ["class_0", "class_1", "class_2"]
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def trained(run_dir):
    """(model, classes, settings) of the tiny run's best.pt."""
    return load_trained(run_dir / "best.pt", "cpu")


@pytest.fixture(scope="module")
def test_images(run_dir, trained):
    """The run's 9 test images, preprocessed as at test time."""
    paths = sorted((run_dir.parent / "data" / "test").rglob("*.jpg"))
    images, kept = inference.load_images(paths, trained[2])
    assert len(kept) == 9
    return images


@pytest.fixture(scope="module")
def torch_dir(run_dir):
    """The torch.export and TorchScript files of the tiny run, written by the command."""
    out = run_dir.parent / "exported"
    assert export_tool.main([str(run_dir / "best.pt"), str(out),
                             "--format=export,torchscript"]) == 0
    return out


@pytest.fixture(scope="module")
def onnx_dir(run_dir):
    out = run_dir.parent / "exported_onnx"
    assert export_tool.main([str(run_dir / "best.pt"), str(out), "--format=onnx"]) == 0
    return out


def expected(model, images):
    s = combined_scores(model, images)
    return s.com, torch.stack(s.heads, 1), torch.stack(s.heads_att, 1)


def assert_reproduces(run, model, images):
    """`run` (images -> combined, heads, heads_att) equals engine.combined_scores on batches
    of 1, 4 and 9 images (the export's example batch has 2)."""
    for n in (1, 4, 9):
        got = run(images[:n])
        want = expected(model, images[:n])
        assert len(got) == 3
        for name, g, w in zip(export.OUTPUT_NAMES, got, want):
            assert g.shape == w.shape, (name, n)
            diff = (g.float() - w).abs().max().item()
            assert diff <= TOLERANCE, f"{name} differs by {diff} on a batch of {n}"
    # The combined score is what evaluation ranks by: the same predictions.
    assert torch.equal(got[0].argmax(1), want[0].argmax(1))


def test_predictor_is_the_combined_score(trained, test_images):
    model = trained[0]
    combined, heads, heads_att = export.predictor_for(model)(test_images)
    s = combined_scores(model, test_images)
    assert torch.equal(combined, s.com)
    assert torch.equal(heads[:, 3], s.heads[3]) and torch.equal(heads_att[:, 0], s.heads_att[0])
    torch.testing.assert_close(heads.sum(1) + heads_att.sum(1), s.com)


def test_torch_export_file_reproduces_the_combined_score(torch_dir, trained, test_images):
    program = torch.export.load(str(torch_dir / "model.pt2"))
    module = program.module()
    assert_reproduces(lambda x: module(x), trained[0], test_images)
    # The batch dimension is symbolic (from 1 up); the image size is fixed.
    assert [str(s) for s in program.range_constraints.values()] == ["VR[1, int_oo]"]
    with pytest.raises(Exception):
        module(torch.zeros(2, 3, 64, 64))


def test_torchscript_file_reproduces_the_combined_score(torch_dir, trained, test_images):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
        module = torch.jit.load(str(torch_dir / "model.ts"))
    assert_reproduces(lambda x: module(x), trained[0], test_images)


def test_onnx_file_reproduces_the_combined_score(onnx_dir, trained, test_images):
    import onnxruntime
    session = onnxruntime.InferenceSession(str(onnx_dir / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert session.get_inputs()[0].shape == ["batch", 3, 32, 32]
    assert [o.name for o in session.get_outputs()] == list(export.OUTPUT_NAMES)

    def run(x):
        return [torch.from_numpy(o) for o in session.run(None, {"images": x.numpy()})]
    assert_reproduces(run, trained[0], test_images)
    info = json.loads((onnx_dir / "model.json").read_text())
    assert info["files"] == {"onnx": "model.onnx"} and info["onnx_opset"] >= 17
    assert info["checks"]["onnx"]["max_abs_diff"] <= 1e-3


def test_load_exported_reads_each_written_format(torch_dir, trained, test_images):
    for fmt in ("export", "torchscript"):
        run = export.load_exported(torch_dir / export.FILE_NAMES[fmt], fmt)
        assert_reproduces(run, trained[0], test_images)


def test_model_json_says_how_to_preprocess_and_read_the_outputs(torch_dir, trained, run_dir):
    info = json.loads((torch_dir / "model.json").read_text())
    assert info["format"] == "cmal-export-1"
    assert info["classes"] == CLASSES and info["num_classes"] == 3
    assert info["image_size"] == 32 and info["resize"] == [36, 36]
    assert info["mean"] == [0.5] * 3 and info["std"] == [0.5] * 3
    assert info["files"] == {"export": "model.pt2", "torchscript": "model.ts"}
    assert info["dynamic_batch"] is True
    assert [o["name"] for o in info["outputs"]] == ["combined", "heads", "heads_att"]
    assert info["outputs"][1]["heads"] == ["expert1", "expert2", "expert3", "concat"]
    for fmt in ("export", "torchscript"):
        assert 0 <= info["checks"][fmt]["max_abs_diff"] <= 1e-3
    # The described steps, rebuilt from the JSON alone, are the run's test transform.
    steps = {s["op"]: s for s in info["preprocessing"]}
    assert list(steps) == ["Resize", "CenterCrop", "ToTensor", "Normalize"]
    rebuilt = T.Compose([
        T.Resize(steps["Resize"]["size"],
                 interpolation=T.InterpolationMode(steps["Resize"]["interpolation"]),
                 antialias=steps["Resize"]["antialias"]),
        T.CenterCrop(steps["CenterCrop"]["size"]), T.ToTensor(),
        T.Normalize(steps["Normalize"]["mean"], steps["Normalize"]["std"])])
    image = load_rgb(next((run_dir.parent / "data" / "test").rglob("*.jpg")))
    assert torch.equal(rebuilt(image), inference.test_transform(trained[2])(image))


def test_existing_files_are_kept_without_overwrite(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.json").write_text("mine")
    assert export_tool.main([str(run_dir / "best.pt"), str(out), "--format=torchscript"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"OUT_DIR {out} already holds an export (model.json)" in err and "--overwrite" in err
    assert (out / "model.json").read_text() == "mine"
    assert sorted(p.name for p in out.iterdir()) == ["model.json"]
    assert export_tool.main([str(run_dir / "best.pt"), str(out), "--format=torchscript",
                             "--overwrite"]) == 0
    assert json.loads((out / "model.json").read_text())["files"] == {"torchscript": "model.ts"}
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.ts"]


def test_bad_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    out = tmp_path / "out"
    missing = tmp_path / "nowhere.pt"
    assert export_tool.main([str(missing), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    assert export_tool.main([str(garbage), str(out), "--format=export"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(garbage) in err
    assert not out.exists()  # nothing is created for a checkpoint that cannot be used


def test_an_exported_file_given_as_a_checkpoint_names_the_one_it_came_from(torch_dir, run_dir,
                                                                          capsys):
    # torch's loader called model.ts unsafe code ("re-save its state_dict from a trusted
    # environment") and model.pt2 truncated or corrupt ("download it again").
    from cmal.tools import predict
    image = next((run_dir.parent / "data" / "test").rglob("*.jpg"))
    for name in ("model.ts", "model.pt2", "model.json"):
        assert predict.main([str(torch_dir / name), str(image)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert f"is a file of the export described by {torch_dir / 'model.json'}" in err
        assert err.endswith(f"pass {run_dir / 'best.pt'}")


def test_out_dir_that_is_a_file_is_refused(run_dir, tmp_path, capsys):
    out = tmp_path / "file"
    out.write_text("x")
    assert export_tool.main([str(run_dir / "best.pt"), str(out), "--format=export"]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "not a folder" in err


def test_unknown_format_is_refused(run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        export_tool.main([str(run_dir / "best.pt"), str(tmp_path / "o"), "--format=tflite"])
    assert exc.value.code == 2
    assert "--format" in capsys.readouterr().err


def test_onnx_without_its_packages_says_what_to_install(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "onnx_missing", lambda: ["onnxruntime"])
    assert export_tool.main([str(run_dir / "best.pt"), str(tmp_path / "o"),
                             "--format=export,onnx"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "--format=onnx" in err and "onnxruntime" in err and "requirements.txt" in err
    assert not (tmp_path / "o").exists()


def test_a_file_that_does_not_reproduce_the_model_is_not_written(run_dir, tmp_path, capsys,
                                                                 monkeypatch):
    load = export.load_exported

    def off_by_a_little(path, fmt, device="cpu"):
        run = load(path, fmt, device)
        return lambda x: tuple(o + 0.01 for o in run(x))
    monkeypatch.setattr(export, "load_exported", off_by_a_little)
    out = tmp_path / "out"
    assert export_tool.main([str(run_dir / "best.pt"), str(out), "--format=torchscript"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--format=torchscript" in err and "differ" in err and "--tolerance" in err
    assert not out.exists()  # neither the file nor a temporary one, nor the folder it made
    # A tolerance the difference is within accepts it.
    assert export_tool.main([str(run_dir / "best.pt"), str(out), "--format=torchscript",
                             "--tolerance=0.02"]) == 0


def test_inplace_abn_layers_are_exported_as_the_pure_abn(trained, test_images, monkeypatch):
    """InPlaceABN (a compiled extension, absent here) is swapped for PureABN with its state."""
    import copy
    from cmal.tresnet import abn

    class StandIn(abn.PureABN):
        pass
    monkeypatch.setattr(abn, "InPlaceABN", StandIn)
    model = copy.deepcopy(trained[0])
    count = 0
    for m in model.modules():
        if type(m) is abn.PureABN:
            m.__class__ = StandIn
            count += 1
    assert count and export.replace_inplace_abn(model) == count
    assert not any(isinstance(m, StandIn) for m in model.modules())
    assert torch.equal(export.predictor_for(model)(test_images)[0],
                       combined_scores(trained[0], test_images).com)


def test_baseline_exports_its_one_head(run_dir, tmp_path):
    """A --method=baseline run exports one output, its head's logits, in every format."""
    data, out = run_dir.parent / "data", tmp_path / "baseline"
    assert train.main({"data_path": str(data), "num_classes": 3, "output_dir": str(out)},
                      TINY_ARGS + ["--epochs=1", "--method=baseline"]) == 0
    exported = tmp_path / "exported"
    assert export_tool.main([str(out / "best.pt"), str(exported),
                             "--format=export,torchscript,onnx"]) == 0
    info = json.loads((exported / export.MANIFEST).read_text())
    assert [o["name"] for o in info["outputs"]] == ["combined"]
    model, _, cfg = load_trained(out / "best.pt", "cpu")
    paths = sorted((data / "test").rglob("*.jpg"))
    images, _ = inference.load_images(paths, cfg)
    with torch.no_grad():
        want = model(images)
    for fmt in export.FORMATS:
        got = export.load_exported(exported / export.FILE_NAMES[fmt], fmt)(images)
        assert len(got) == 1
        assert (got[0] - want).abs().max() <= TOLERANCE, fmt


def test_a_full_disk_is_named_not_blamed_on_the_format(run_dir, tmp_path, capsys, monkeypatch):
    """torch's writers report a full disk as a RuntimeError without an errno: the free space of
    the folder tells it."""
    import collections
    import shutil

    def full_disk(program, path):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(export, "save_program", full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: collections.namedtuple(
        "usage", "total used free")(1 << 30, 1 << 30, 4096))
    out = tmp_path / "out"
    assert export_tool.main([str(run_dir / "best.pt"), str(out), "--format=export"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the tool's progress lines
    assert err.startswith("error: ") and f"while writing {out / 'model.pt2'};" in err
    assert f"no space left on the device holding {out}" in err and "free space" in err
    assert f"nothing was written to {out}" in err and "leave export out" not in err
    assert not out.exists()  # the folder the export created is removed with its lock
