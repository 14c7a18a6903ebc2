"""A trained CMAL-Net as one network for deployment: the two-pass "combined" prediction in a
single forward, exported with torch.export (.pt2), TorchScript (.ts) and ONNX (.onnx).

CombinedPredictor.forward(images) runs engine.combined_scores, the score evaluation ranks by
(spec section 5): the raw pass; each expert's class activation map (for the class that expert
predicts); the joint attention crop of the three maps, resized back to the input size; a second
pass on that crop; the four logits of each pass summed. It returns three tensors:

    combined   (B, K)     the sum of the eight logits: argmax is the prediction, softmax the
                          scores cmal.tools.predict prints
    heads      (B, 4, K)  the raw pass's logits of expert 1, 2, 3 and the concatenation head
    heads_att  (B, 4, K)  the same four heads on the joint attention crop

so combined == heads.sum(1) + heads_att.sum(1) (up to float rounding), and heads[:, 3] alone is
the paper's "concat" prediction. A baseline run (--method=baseline) has one head and one pass:
its export returns `combined` alone, that head's logits. Input: (B, 3, S, S) float32 images at the trained size S,
preprocessed as at test time (model.json in an export folder says how). The batch size is
dynamic in all three formats; the image size is fixed.
"""
import copy
import importlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

from cmal import methods
from cmal.scores import combined_scores
from cmal.errors import UserError, device_full, disk_full_cause, write_error
from cmal.checkpoint import EXPORT_FILE_NAMES, EXPORT_MANIFEST
from cmal.distributed import unwrap

FORMATS = ("export", "torchscript", "onnx")
FILE_NAMES, MANIFEST = EXPORT_FILE_NAMES, EXPORT_MANIFEST
MANIFEST_FORMAT = "cmal-export-1"
INPUT_NAME = "images"
OUTPUT_NAMES = ("combined", "heads", "heads_att")
HEAD_NAMES = ("expert1", "expert2", "expert3", "concat")
# The example batch the network is exported with; every batch size from 1 up runs.
EXAMPLE_BATCH = 2
# What the ONNX format needs: the exporter (onnx, onnxscript) and the runtime that checks it.
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


class ExportError(UserError):
    """A network that could not be exported, or whose export does not reproduce it."""


class CombinedPredictor(nn.Module):
    """A trained CMALNet's combined prediction as one forward: (combined, heads, heads_att)."""

    def __init__(self, model):
        super().__init__()
        self.model = unwrap(model)
        self.single_head = not methods.of_network(self.model).experts
        self.output_names = OUTPUT_NAMES[:1] if self.single_head else OUTPUT_NAMES

    def forward(self, images):
        if self.single_head:
            return (self.model(images),)
        s = combined_scores(self.model, images)
        return s.com, torch.stack(s.heads, 1), torch.stack(s.heads_att, 1)


def predictor_for(model):
    """The CombinedPredictor of a trained CMALNet, ready to export: in eval mode, parameters
    frozen (so no exported format records gradients), and InPlaceABN layers (a compiled
    extension no exporter can read) replaced by the pure-PyTorch ABN, which computes the same
    function with the same parameters. Changes `model` in place."""
    model = unwrap(model)
    replace_inplace_abn(model)
    return CombinedPredictor(model).eval().requires_grad_(False)


def replace_inplace_abn(model):
    """Swap every InPlaceABN module of `model` for a PureABN holding its parameters and running
    statistics; returns how many were swapped."""
    from cmal.tresnet import abn
    if abn.InPlaceABN is None:
        return 0
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, abn.InPlaceABN):
                pure = abn.PureABN(child.num_features, eps=child.eps, momentum=child.momentum,
                                   activation=child.activation,
                                   activation_param=child.activation_param)
                pure.load_state_dict(child.state_dict())
                pure.train(child.training)
                setattr(parent, name, pure.to(child.weight.device))
                swapped += 1
    return swapped


def example_images(image_size, batch=EXAMPLE_BATCH, device="cpu", seed=0):
    """A reproducible batch of normalised images, uniform in [-1, 1] as the test transform's
    outputs are."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, image_size, image_size, generator=g) * 2 - 1
    return x.to(device)


# ---------------------------------------------------------------------------------------------
# Writing each format


def export_program(predictor, example):
    """torch.export's ExportedProgram of `predictor` (its batch dimension dynamic, from 1 up),
    traced with gradients off: a flat graph of ATen operations."""
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(predictor, (example,),
                                   dynamic_shapes={INPUT_NAME: {0: batch}}, strict=False)


def save_program(program, path):
    torch.export.save(program, str(path))


def export_torchscript(predictor, example):
    """torch.jit.trace of `predictor`: the trace follows the batch size (aten::size), while the
    image size is fixed, as the tracer's warnings about shape checks say (they are silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
        with torch.no_grad():
            return torch.jit.trace(predictor, (example,), check_trace=False)


def save_torchscript(module, path):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
        torch.jit.save(module, str(path))


def onnx_missing():
    """The ONNX packages that cannot be imported here (empty when ONNX export can work)."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def require_onnx():
    missing = onnx_missing()
    if missing:
        raise ExportError(
            f"--format=onnx needs the Python packages {', '.join(ONNX_PACKAGES)} (torch's ONNX "
            f"exporter and the runtime that checks the file); {', '.join(missing)} cannot be "
            "imported. Install the versions pinned in requirements.txt (make setup, or pip "
            "install -e '.[onnx]'), or leave onnx out of --format")


def export_onnx(program, path, output_names=OUTPUT_NAMES):
    """Write the ONNX model of an ExportedProgram (weights inside the file, batch dimension
    named "batch"); returns the opset version."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        onnx_program = torch.onnx.export(program, dynamo=True, output_names=list(output_names),
                                         verbose=False)
    _name_batch_dimension(onnx_program.model)
    onnx_program.save(str(path), external_data=False)
    return onnx_program.model.opset_imports.get("", None)


def _name_batch_dimension(model):
    """Give the input's symbolic batch dimension (named like "s34" by the exporter) the name
    "batch" in every value of the graph."""
    import onnx_ir as ir
    symbol = model.graph.inputs[0].shape[0]
    if not isinstance(symbol, ir.SymbolicDim):
        return

    def renamed(shape):
        return ir.Shape([ir.SymbolicDim("batch") if isinstance(d, ir.SymbolicDim)
                         and d.value == symbol.value else d for d in shape])

    values = list(model.graph.inputs)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        values.extend(node.outputs)
    for value in values:
        if value.shape is not None:
            value.shape = renamed(value.shape)


# ---------------------------------------------------------------------------------------------
# Reading each format back


def load_exported(path, fmt, device="cpu"):
    """A function images -> the exported outputs (combined, heads, heads_att; a baseline's combined
    alone) from an exported file, as torch tensors on `device`; the way a deployment loads each
    format, in Python."""
    path = str(path)
    if fmt == "export":
        module = torch.export.load(path).module()
        return lambda images: tuple(module(images))
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated")
            module = torch.jit.load(path, map_location=device)
        return lambda images: tuple(module(images))
    if fmt == "onnx":
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

        def run(images):
            outputs = session.run(None, {INPUT_NAME: images.cpu().numpy()})  # all, in order
            return tuple(torch.from_numpy(o).to(images.device) for o in outputs)
        return run
    raise ValueError(f"unknown export format {fmt!r}; one of {', '.join(FORMATS)}")


def max_differences(outputs, reference, names=OUTPUT_NAMES):
    """{output name: max abs difference} between two tuples of outputs named `names`."""
    return {name: float((o.float().cpu() - r.float().cpu()).abs().max())
            for name, o, r in zip(names, outputs, reference, strict=True)}


# ---------------------------------------------------------------------------------------------
# The whole export of a folder


def export_formats(predictor, image_size, formats, out_dir, check_batch=3, tolerance=1e-3,
                   log=print, describe=None):
    """Write `formats` of `predictor` into `out_dir` (their FILE_NAMES) and check each file;
    with `describe` (results -> the dict of model.json), model.json too.

    Each file is written under a temporary name of its own, loaded back and run on a random
    batch of `check_batch` images (a size other than the export's example, so a fixed batch size
    would show); its outputs must be within `tolerance` (max abs difference, every output) of
    the PyTorch predictor's. Only when every format passes do the files replace the folder's
    previous export as one set (install); otherwise the temporary files are removed and
    ExportError says which format differed by how much. ONNX is always exported from, and
    checked on, the CPU. The caller holds the folder (export_lock) and has checked that its
    previous export, if any, may be replaced.
    Returns {format: {"file", "max_abs_diff", "seconds", ...}}.
    """
    out_dir = Path(out_dir)
    device = next(predictor.parameters()).device
    done, temporary = {}, []
    program = None
    try:
        for fmt in formats:
            final = out_dir / FILE_NAMES[fmt]
            tmp = _temporary_name(final)
            temporary.append((tmp, final))
            started = time.perf_counter()
            info = {}
            reference_predictor = predictor
            try:
                if fmt == "export":
                    program = export_program(predictor, example_images(image_size,
                                                                       device=device))
                    save_program(program, tmp)
                elif fmt == "torchscript":
                    save_torchscript(export_torchscript(
                        predictor, example_images(image_size, device=device)), tmp)
                else:
                    if device.type != "cpu":
                        reference_predictor = copy.deepcopy(predictor).cpu()
                        cpu_program = export_program(reference_predictor,
                                                     example_images(image_size))
                    else:
                        cpu_program = program or export_program(predictor,
                                                                example_images(image_size))
                    info["opset"] = export_onnx(cpu_program, tmp, predictor.output_names)
            except Exception as exc:
                full = disk_full_cause(exc) or device_full(out_dir)
                if full is not None:  # not the format's fault: the files do not fit
                    raise write_error(final, full, f"nothing was written to {out_dir}") from None
                raise ExportError(f"--format={fmt}: exporting the network failed "
                                  f"({type(exc).__name__}: {_first_line(exc)}); leave {fmt} out "
                                  "of --format to write the other formats") from exc
            seconds = time.perf_counter() - started
            ref_device = next(reference_predictor.parameters()).device
            images = example_images(image_size, batch=check_batch, device=ref_device, seed=1)
            with torch.no_grad():
                reference = reference_predictor(images)
                outputs = load_exported(tmp, fmt, ref_device)(images)
            diffs = max_differences(outputs, reference, predictor.output_names)
            worst = max(diffs.values())
            log(f"{fmt}: {final.name} ({tmp.stat().st_size / 2 ** 20:.1f} MiB, {seconds:.1f} s); "
                f"on a batch of {check_batch}, max abs difference from the PyTorch model: "
                + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()))
            if not worst <= tolerance:  # also NaN
                raise ExportError(
                    f"--format={fmt}: the exported network's outputs differ from the PyTorch "
                    f"model's by up to {worst:.3g} on a random batch (--tolerance={tolerance:g}); "
                    f"nothing was written to {out_dir}. Leave {fmt} out of --format, or raise "
                    "--tolerance if the difference is acceptable")
            done[fmt] = {"file": final.name, "max_abs_diff": worst,
                         "max_abs_diff_per_output": diffs, "check_batch": check_batch,
                         "seconds": round(seconds, 2), **info}
        install(out_dir, temporary, describe(done) if describe else None)
        temporary = []
    finally:
        for tmp, _ in temporary:
            tmp.unlink(missing_ok=True)
    return done


def _temporary_name(final):
    """A new file beside `final` for its content to be written into, under a name no other
    process uses (it keeps `final`'s suffix, by which some writers choose the format), with the
    permissions a plain open() would give."""
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.stem}.",
                               suffix=f".tmp{final.suffix}")
    mask = os.umask(0)
    os.umask(mask)
    os.fchmod(fd, 0o666 & ~mask)
    os.close(fd)
    return Path(tmp)


def previous_export(out_dir):
    """The names of the files an export wrote in `out_dir` (any format's, and model.json)."""
    return [name for name in (*FILE_NAMES.values(), MANIFEST)
            if (Path(out_dir) / name).exists() or (Path(out_dir) / name).is_symlink()]


def install(out_dir, staged, description=None):
    """Make the checked files `staged` ([(temporary, final)]) and `description` (model.json's
    dict) the folder's export, removing every file of the previous one, so that the folder's
    files describe one checkpoint. model.json goes first and comes back last: while the files
    change, no model.json names a mixed set."""
    out_dir = Path(out_dir)
    (out_dir / MANIFEST).unlink(missing_ok=True)
    new = {final.name for _, final in staged}
    for name in FILE_NAMES.values():
        if name not in new:
            (out_dir / name).unlink(missing_ok=True)
    for tmp, final in staged:
        tmp.replace(final)
    if description is not None:
        from cmal.files import write_text
        write_text(out_dir / MANIFEST, json.dumps(description, indent=2) + "\n")


def remove_partial_files(out_dir):
    """Delete the temporary files of an export that was killed (call with the folder's lock
    held: then no export is writing them)."""
    for tmp in Path(out_dir).glob(".model.*.tmp*"):
        tmp.unlink(missing_ok=True)


def export_lock(out_dir):
    """The folder's lock (files.RunLock, the one training runs take): one export, or one
    training run, writes into a folder at a time. Creates the folder; release() removes it again
    if it stayed empty."""
    from cmal.files import RunLock
    return RunLock(out_dir, owner="export", option="OUT_DIR")


def _first_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def describe_preprocessing(transform):
    """The steps of a torchvision test transform as JSON-ready dicts, in order."""
    steps = []
    for t in getattr(transform, "transforms", [transform]):
        name = type(t).__name__
        step = {"op": name}
        if name == "Resize":
            size = t.size if isinstance(t.size, (list, tuple)) else [t.size]
            step.update(size=list(size), interpolation=t.interpolation.value,
                        antialias=bool(t.antialias))
        elif name == "CenterCrop":
            step.update(size=list(t.size))
        elif name == "ToTensor":
            step.update(note="RGB uint8 HWC -> float32 CHW, divided by 255")
        elif name == "Normalize":
            step.update(mean=[float(v) for v in t.mean], std=[float(v) for v in t.std],
                        note="(x - mean) / std per channel")
        steps.append(step)
    return steps


def manifest(classes, cfg, transform, checkpoint, device, results):
    """What model.json holds: how to prepare the input, what the outputs mean, which files."""
    steps = describe_preprocessing(transform)
    normalize = next((s for s in steps if s["op"] == "Normalize"), {})
    resize = next((s for s in steps if s["op"] == "Resize"), {})
    k = len(classes)
    return {
        "format": MANIFEST_FORMAT,
        "classes": list(classes),
        "num_classes": k,
        "image_size": cfg.image_size,
        "resize": resize.get("size"),
        "mean": normalize.get("mean"),
        "std": normalize.get("std"),
        "preprocessing": steps,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, cfg.image_size, cfg.image_size],
                  "dtype": "float32", "layout": "NCHW, RGB",
                  "note": "decode as RGB (transparency composited onto white), then the "
                          "preprocessing steps in order"},
        "outputs": [
            {"name": "combined", "shape": ["batch", k],
             "meaning": "the logits of the baseline's one head (--method=baseline): argmax is "
                        "the predicted class index into classes, softmax the scores"}
        ] if not methods.method_of(cfg).experts else [
            {"name": "combined", "shape": ["batch", k],
             "meaning": "the combined score evaluation ranks by: the four logits of the raw "
                        "pass plus the four of the pass on the joint attention crop; argmax "
                        "is the predicted class index into classes, softmax the scores"},
            {"name": "heads", "shape": ["batch", 4, k], "heads": list(HEAD_NAMES),
             "meaning": "the raw pass's logits of expert 1, 2, 3 and the concatenation head"},
            {"name": "heads_att", "shape": ["batch", 4, k], "heads": list(HEAD_NAMES),
             "meaning": "the same four heads' logits on the joint attention crop"},
        ],
        "dynamic_batch": True,
        "files": {fmt: r["file"] for fmt, r in results.items()},
        "checks": {fmt: {key: r[key] for key in ("max_abs_diff", "max_abs_diff_per_output",
                                                  "check_batch")}
                   for fmt, r in results.items()},
        "onnx_opset": results.get("onnx", {}).get("opset"),
        "device": str(device),
        "torch_version": torch.__version__,
        "checkpoint": str(checkpoint),
    }
