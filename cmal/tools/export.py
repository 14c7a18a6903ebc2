"""Export a trained CMAL-Net for deployment: the two-pass combined prediction as one network.

    python -m cmal.tools.export CHECKPOINT OUT_DIR [--format export,torchscript,onnx]

Writes into OUT_DIR model.pt2 (torch.export's ExportedProgram), model.ts (TorchScript) and
model.onnx (ONNX), as --format asks, and model.json: the class names, the preprocessing a
deployment must apply (resize, centre crop, normalisation mean and std, from the run's test
transform), and what the three outputs mean. Each network takes (batch, 3, S, S) normalised
float32 images at the trained size S, any batch size from 1, and returns (combined, heads,
heads_att): the combined score that evaluation ranks by (the raw pass and the pass on the joint
attention crop, their eight logits summed), and each pass's four head logits. Every file is
loaded back and checked against the PyTorch model on a random batch; the largest difference is
printed, and beyond --tolerance nothing is written. A previous export in OUT_DIR is kept unless
--overwrite, which replaces all of its files (of every format) with the new set; one export (or
training run) writes into a folder at a time (OUT_DIR/.run.lock).
Exit status 0 on success, 2 when the checkpoint, OUT_DIR or a format cannot be used (one line on
stderr says which and what to do).
"""
import argparse
import sys
from pathlib import Path


from cmal import export
from cmal.distributed import pick_device
from cmal.errors import run_command
from cmal.inference import ToolError, check_output, load_model, test_transform
from cmal.settings import parse_bool


def parse_formats(text):
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in export.FORMATS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a comma-separated list of {', '.join(export.FORMATS)}")
    return [f for f in export.FORMATS if f in names]  # each once, in the order written


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="Export a trained CMAL-Net's combined prediction (raw pass, joint attention "
                    "crop, second pass, logits summed) as one network for deployment, with a "
                    "model.json describing its preprocessing, classes and outputs; each file is "
                    "checked against the PyTorch model.",
        allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="last.pt or best.pt of a training run")
    p.add_argument("out_dir", help="folder for the exported files and model.json (created if "
                                   "missing)")
    p.add_argument("--format", type=parse_formats, default=",".join(export.FORMATS),
                   help="comma-separated formats to write: export (torch.export, model.pt2), "
                        "torchscript (model.ts), onnx (model.onnx; needs onnx, onnxscript and "
                        "onnxruntime)")
    p.add_argument("--device", default="cpu",
                   help="device the model.pt2 and model.ts networks are built for: cpu, cuda, "
                        "cuda:1, ... (auto: cuda when available); ONNX is always exported "
                        "from the CPU")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest accepted absolute difference between an exported network's "
                        "outputs and the PyTorch model's, on a random batch")
    p.add_argument("--check_batch", type=int, default=3,
                   help="images in the random batch each exported file is checked on (the "
                        f"export's example batch has {export.EXAMPLE_BATCH}, so this also "
                        "checks that the batch size is free)")
    p.add_argument("--overwrite", type=parse_bool, nargs="?", const=True, default=False,
                   help="replace a previous export in OUT_DIR: all of its files, of every "
                        "format, and its model.json")
    args = p.parse_args(argv)
    if args.check_batch < 1:
        p.error(f"--check_batch must be at least 1, got {args.check_batch}")
    if not args.tolerance >= 0:
        p.error(f"--tolerance must be a number of at least 0, got {args.tolerance}")
    return args


def check_out_dir(out, checkpoint, overwrite):
    """Refuse an OUT_DIR holding a previous export (the files of any format, or model.json)
    without --overwrite, and one whose export files would replace the checkpoint, always.
    Called with the folder's lock held, so that no other export writes in between."""
    for name in (*export.FILE_NAMES.values(), export.MANIFEST):
        check_output(out / name, [checkpoint], True, "OUT_DIR")
    found = export.previous_export(out)
    if found and not overwrite:
        raise ToolError(f"OUT_DIR {out} already holds an export ({', '.join(found)}); choose "
                        "another OUT_DIR, or pass --overwrite to replace it (all of its files)")


def run(args):
    formats = args.format
    if "onnx" in formats:
        export.require_onnx()
    device = pick_device(args.device)
    out = Path(args.out_dir)
    # The lock, then every check: two exports into one folder cannot interleave their files,
    # and what is checked is what is replaced.
    lock = export.export_lock(out).acquire()
    try:
        check_out_dir(out, args.checkpoint, args.overwrite)
        export.remove_partial_files(out)
        model, classes, cfg = load_model(args.checkpoint, device)
        predictor = export.predictor_for(model)
        print(f"exporting {args.checkpoint} ({len(classes)} classes, {cfg.image_size} px images) "
              f"as {', '.join(formats)} on {device}", file=sys.stderr)
        try:
            results = export.export_formats(
                predictor, cfg.image_size, formats, out, check_batch=args.check_batch,
                tolerance=args.tolerance,
                describe=lambda results: export.manifest(classes, cfg, test_transform(cfg),
                                                         args.checkpoint, device, results))
        except OSError as exc:
            raise ToolError(f"cannot write into OUT_DIR {out} ({exc.strerror or exc}); choose "
                            "another OUT_DIR") from None
    finally:
        lock.release()
    print(f"wrote {', '.join(r['file'] for r in results.values())} and {export.MANIFEST} "
          f"into {out}", file=sys.stderr)
    return 0


def main(argv=None):
    return run_command(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
