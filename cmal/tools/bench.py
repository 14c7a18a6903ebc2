"""Throughput and memory of one CMAL-Net training iteration (train_step) and of evaluation.

    python -m cmal.tools.bench                                  # full TResNet-L-V2, 224 px, batch 4, auto device
    python -m cmal.tools.bench --image_size=368 --batch_size=16 --device=cuda --amp=bf16 --channels_last
    python -m cmal.tools.bench --loader --workers=2             # the input pipeline on large JPEGs
    python -m cmal.tools.bench --compare --image_size=368 --batch_size=16 --num_classes=196 --device=cuda
                                                     # the reference's set-up against faster ones

For each of train_step and evaluate it prints images/s, peak memory, FLOPs per image (counted
by torch.utils.flop_counter) and the achieved GFLOP/s, next to the GFLOP/s of a large float32
matmul on the same device: the fraction says how well the convolutions use the machine. Each
measurement runs in a fresh process, so that peak memory is its own.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from cmal import settings
from cmal.distributed import pick_device
from cmal.cuda_graph import GraphedIteration, GraphedScores
from cmal.engine import evaluate, train_step
from cmal.errors import run_command
from cmal.model import build_cmal, compile_network
from cmal.optimizer import make_optimizer
from cmal.precision import Precision
from cmal.tresnet.abn import inplace_abn_available

PROJECT = Path(__file__).resolve().parents[2]  # the folder that holds the cmal package

# The settings of train.py that describe what is measured, with the benchmark's defaults.
MEASURED = ("image_size", "batch_size", "num_classes", "device", "layers", "width_factor",
            "head_mid", "head_features", "head_hidden", "amp", "channels_last", "compile", "abn",
            "sgd", "cuda_graph", "workers")
DEFAULTS = {"image_size": 224, "batch_size": 4, "num_classes": 200, "workers": 2}


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    settings.add_arguments(p, MEASURED, DEFAULTS)
    p.add_argument("--iters", type=int, default=3, help="timed iterations")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--compare", action="store_true",
                   help="time the reference's configuration (fp32, eager, InPlaceABN, SGD per "
                        "parameter) against each faster one and print a table")
    p.add_argument("--rows", default="",
                   help="--compare: only these rows of the table, e.g. 0,3 (0 is the reference's "
                        "set-up; default all)")
    p.add_argument("--loader", action="store_true",
                   help="measure the training input pipeline instead, on generated JPEGs "
                        "(--workers loading processes)")
    p.add_argument("--images", type=int, default=64, help="--loader: how many JPEGs")
    p.add_argument("--jpeg_size", default="1500x1000", help="--loader: width x height")
    p.add_argument("--mode", default="all", choices=["all", "train", "eval", "matmul"],
                   help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def matmul_gflops(device, n=4096, dtype=torch.float32, seconds=2.0):
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    count, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        count += 1
        _sync(device)
    return 2 * n ** 3 * count / (time.perf_counter() - t0) / 1e9


def _count_flops(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _count_ops(fn):
    """ATen operations one call runs: on CUDA about one kernel launch each, which is what
    bounds a step of small kernels (../shared/gpu/H100_PROFILE.md)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))
    with Count():
        fn()
    return Count.n


def measure(args):
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "matmul":
        return {"matmul_gflops": matmul_gflops(device)}
    torch.manual_seed(0)
    graphs = settings.use_cuda_graph(args, device)
    precision = Precision(args.amp, device)
    net = build_cmal(args.num_classes, layers=args.layers,
                     width_factor=args.width_factor, mid_channels=args.head_mid,
                     feature_channels=args.head_features, hidden=args.head_hidden,
                     abn=precision.abn_kind(args.abn, cuda_graph=graphs))
    net = net.to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.arange(args.batch_size, device=device) % args.num_classes
    criterion = nn.CrossEntropyLoss()
    runner = compile_network(net) if args.compile else net
    if args.mode == "train":
        optimizer = make_optimizer(net, impl=args.sgd)
        step = GraphedIteration() if graphs else train_step

        def once():
            step(runner, optimizer, x, y, criterion, precision=precision)
    else:
        loader = [(x, y, 0)]
        scores = GraphedScores(precision) if graphs else None

        def once():
            evaluate(net, loader, criterion, device, precision, args.channels_last, scores=scores)
    # The peak from the first call on: a graph's memory is taken while it is captured.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # A graphed iteration runs its first call eagerly (until every parameter has a gradient)
    # and captures on the second.
    for _ in range(max(args.warmup, 2 if graphs else 0)):
        once()
    counted = not args.compile and not graphs  # a replay runs no operation the counters see
    flops = _count_flops(once) if counted else None
    ops = _count_ops(once) if counted else None
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        once()
    _sync(device)
    seconds = (time.perf_counter() - t0) / args.iters
    result = {"images_per_s": args.batch_size / seconds, "seconds_per_batch": seconds,
              "peak_mb": _peak_mb(device)}
    if device.type == "cuda":  # what the process holds from the GPU's memory, cached blocks too
        result["reserved_mb"] = torch.cuda.memory_reserved(device) / 2 ** 20
    if ops:
        result["ops"] = ops
    if graphs:
        result["graph"] = True
    if flops:
        result["gflop_per_image"] = flops / args.batch_size / 1e9
        result["gflops"] = flops / seconds / 1e9
    return result


def _child(argv, mode):
    """One measurement in a fresh process (its own peak memory), with these bench.py options."""
    argv = [a for a in argv if not a.startswith("--mode")] + [f"--mode={mode}", "--json"]
    # The child imports cmal from the folder that holds it, whatever the working folder.
    path = os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-m", "cmal.tools.bench"] + argv, capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": path})
    if out.returncode != 0:
        raise RuntimeError(f"bench.py {' '.join(argv)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# The reference's set-up first; then one lever at a time, then together. "abn" is an --abn
# value; the reference's InPlaceABN is replaced by the pure ABN where inplace_abn is missing.
COMPARED = [
    ("reference set-up: fp32, eager, InPlaceABN, SGD per parameter",
     ["--amp=none", "--abn=inplace", "--sgd=loop", "--cuda_graph=false"]),
    ("fp32, eager, foreach SGD", ["--amp=none", "--abn=inplace", "--sgd=foreach",
                                  "--cuda_graph=false"]),
    ("fp32, native ABN, CUDA graph", ["--amp=none", "--abn=native", "--sgd=fused",
                                      "--cuda_graph=true"]),
    ("bf16, native ABN, eager, foreach SGD", ["--amp=bf16", "--abn=native", "--sgd=foreach",
                                              "--cuda_graph=false"]),
    ("bf16, native ABN, CUDA graph", ["--amp=bf16", "--abn=native", "--sgd=fused",
                                      "--cuda_graph=true"]),
    ("bf16, native ABN, CUDA graph, channels_last",
     ["--amp=bf16", "--abn=native", "--sgd=fused", "--cuda_graph=true", "--channels_last"]),
    ("fp32, native ABN, compile", ["--amp=none", "--abn=native", "--sgd=foreach", "--compile",
                                   "--cuda_graph=false"]),
    ("bf16, native ABN, fused SGD, compile", ["--amp=bf16", "--abn=native", "--sgd=fused",
                                              "--compile", "--cuda_graph=false"]),
]
_COMPARED_OPTIONS = ("--amp", "--abn", "--sgd", "--compile", "--channels_last", "--compare",
                     "--rows", "--cuda_graph")


def compare(args, argv):
    """Every COMPARED configuration on the same model, input and device, each in its own
    process: img/s of train_step and evaluate, peak memory, and the ratio to the first row."""
    common = [a for a in argv if not a.startswith(_COMPARED_OPTIONS)]
    if not inplace_abn_available():
        print("note: inplace_abn is not installed; the rows that name InPlaceABN use the pure ABN")
    if pick_device(args.device).type != "cuda":
        print("note: no CUDA device; the rows that name a CUDA graph run eagerly")
    print("| configuration | train_step img/s | vs reference | peak memory | ATen ops per "
          "iteration | evaluate img/s | vs reference |")
    print("|---|---|---|---|---|---|---|")
    rows = [int(i) for i in args.rows.split(",")] if args.rows else range(len(COMPARED))
    base = None
    for label, options in (COMPARED[i] for i in rows):
        if not inplace_abn_available():
            options = [o.replace("--abn=inplace", "--abn=pure") for o in options]
        try:
            train, evaluation = (_child(common + options, mode) for mode in ("train", "eval"))
        except RuntimeError as exc:
            print(f"| {label} | failed: {str(exc).strip().splitlines()[-1][:120]} | | | | | |")
            continue
        base = base or (train["images_per_s"], evaluation["images_per_s"])
        ops = f"{train['ops']:,}" if "ops" in train else \
            "one graph" if train.get("graph") else "compiled"
        held = f" ({train['reserved_mb'] / 1024:.2f} held)" if "reserved_mb" in train else ""
        print(f"| {label} | {train['images_per_s']:.2f} | {train['images_per_s'] / base[0]:.2f}x "
              f"| {train['peak_mb'] / 1024:.2f} GiB{held} | {ops} | {evaluation['images_per_s']:.2f} | "
              f"{evaluation['images_per_s'] / base[1]:.2f}x |", flush=True)
    return 0


def _photo_like(rng, width, height):
    """A smooth colour field with edges and grain, which compresses like a photograph."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter
    small = rng.integers(0, 256, (height // 100 + 2, width // 100 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(40):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(10, 200))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    img = img.filter(ImageFilter.GaussianBlur(2))
    grain = rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8))


def loader_benchmark(args):
    """img/s of the reference train transform through DataLoader, plain and with --fast_decode,
    and how far the fast path's (test-transform) output is from the plain one."""
    import tempfile
    import numpy as np
    from torch.utils.data import DataLoader
    from cmal.data import EpochSampler, ImageDataset, build_transforms, collate_skipping
    from cmal.images import load_rgb
    width, height = (int(v) for v in args.jpeg_size.split("x"))
    resize = round(args.image_size * 421 / 368)
    train_tf, test_tf = build_transforms(args.image_size, resize, 8)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for i in range(args.images):
            paths.append(f"{folder}/{i}.jpg")
            _photo_like(rng, width, height).save(paths[-1], quality=90)
        print(f"loader: {args.images} JPEGs of {width}x{height}, train transform to "
              f"{args.image_size} px (resize {resize}), batch {args.batch_size}, "
              f"{args.workers} workers")
        rates = {}
        for name, draft in (("plain", None), ("fast_decode", resize)):
            ds = ImageDataset([(p, 0) for p in paths], ["x"], train_tf, draft_size=draft)
            loader = DataLoader(ds, batch_size=args.batch_size, sampler=EpochSampler(len(ds)),
                                num_workers=args.workers, collate_fn=collate_skipping)
            next(iter(loader))  # start the workers before timing
            t0 = time.perf_counter()
            n = sum(len(batch[1]) for batch in loader)
            rates[name] = n / (time.perf_counter() - t0)
            print(f"  {name:12s}: {rates[name]:7.1f} img/s, "
                  f"{rates[name] / max(args.workers, 1):6.1f} img/s per worker")
        diffs = [(test_tf(load_rgb(p, draft_size=resize)) - test_tf(load_rgb(p))).abs()
                 for p in paths[:16]]
        every = torch.cat([d.flatten() for d in diffs]).numpy()
        mean, p99, worst = every.mean(), np.percentile(every, 99), every.max()
        print(f"  fast_decode is {rates['fast_decode'] / rates['plain']:.1f}x the plain path; its "
              f"output differs from the reference transform's by {mean:.4f} on average, "
              f"{p99:.3f} at the 99th percentile, {worst:.3f} at most (normalised units, range 2)")
    return 0


def run(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    if args.loader:
        return loader_benchmark(args)
    if args.mode != "all":
        print(json.dumps(measure(args)))
        return 0
    device = pick_device(args.device)
    if args.compare:
        _describe(args, device, per_configuration=False)
        return compare(args, argv)
    _describe(args, device)
    mm = _child(argv, "matmul")["matmul_gflops"]
    print(f"matmul (float32, 4096^2): {mm:.1f} GFLOP/s")
    for mode, label in (("train", "train_step"), ("eval", "evaluate")):
        r = _child(argv, mode)
        line = f"{label:10s}: {r['images_per_s']:8.2f} img/s  peak memory {r['peak_mb']:8.0f} MB"
        if "gflops" in r:
            line += (f"  {r['gflop_per_image']:6.1f} GFLOP/img  {r['gflops']:7.1f} GFLOP/s "
                     f"({100 * r['gflops'] / mm:.0f}% of matmul)")
        print(line)
    return 0


def _describe(args, device, per_configuration=True):
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    line = (f"device: {device} ({name}); torch {torch.__version__}; input {args.image_size} px, "
            f"batch {args.batch_size}, {args.num_classes} classes, layers {args.layers}, width "
            f"{args.width_factor}")
    if per_configuration:
        graphs = settings.use_cuda_graph(args, device)
        abn = Precision(args.amp, device).abn_kind(args.abn, cuda_graph=graphs)
        line += (f", amp {args.amp}, channels_last {args.channels_last}, compile {args.compile}, "
                 f"abn {args.abn} ({abn}), sgd {args.sgd}, cuda_graph {graphs}")
    print(line)


def main(argv=None):
    return run_command(run, argv)


if __name__ == "__main__":
    sys.exit(main())
