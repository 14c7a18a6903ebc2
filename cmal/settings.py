"""Every setting of a training run in one place: its type, default and help; parsing from a dataset
script's settings block and the command line; validation; reading them back from a checkpoint.

A dataset script's block and the command line may name only the fields of `Settings`; a
misspelt name stops with the closest valid one, and options are never matched by prefix.
"""
import argparse
import dataclasses
import difflib
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Optional


from cmal.folders import CHECKS
from cmal.errors import UserError
from cmal.methods import ABLATIONS, METHODS, REGISTRY
from cmal.optimizer import SGD_IMPLS
from cmal.tresnet.abn import ABN_CHOICES

AMP_CHOICES = ("none", "bf16", "fp16")
CUDA_GRAPH_CHOICES = ("auto", "true", "false")


class SettingsError(UserError):
    """A settings block or a command line naming a setting that does not exist."""


def parse_bool(text):
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _parse_progress(text):
    value = str(text).strip().lower()
    return value if value == "auto" else str(parse_bool(value)).lower()


def parse_val_split(text):
    """--val_split: 'none', 'folder', or the held-out fraction of train (0 < F < 1) as text."""
    value = str(text).strip().lower()
    if value in ("none", "folder", ""):
        return value or "none"
    try:
        fraction = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected none, folder or a fraction such as 0.1, got "
                                         f"{text!r}") from None
    if not 0 < fraction < 1:
        raise argparse.ArgumentTypeError(f"a held-out fraction lies strictly between 0 and 1, "
                                         f"got {text!r}")
    return repr(fraction)


def show_progress(cfg):
    """Whether this process draws progress bars (--progress, and auto: on a terminal)."""
    if cfg.progress == "auto":
        return sys.stderr.isatty()
    return cfg.progress == "true"


def parse_layers(text):
    """'3,4,23,3' (or a sequence of four integers) -> (3, 4, 23, 3)."""
    parts = str(text).strip("()[] ").split(",") if isinstance(text, str) else list(text)
    try:
        return tuple(int(n) for n in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected four comma-separated integers, got "
                                         f"{text!r}") from None


def _setting(default, parse, help, choices=None, bare=None):
    """A field of Settings: `parse` turns command-line text into the value; `bare` is the value of
    the option given without one (`--resume`, `--compile`)."""
    return field(default=default, metadata={"parse": parse, "help": help, "choices": choices,
                                            "bare": bare})


@dataclass
class Settings:
    data_path: Optional[str] = _setting(
        None, str, "dataset root holding train/<class>/ and test/<class>/")
    num_classes: Optional[int] = _setting(
        None, int, "number of classes (checked against the class folders; by default their "
                   "number)")
    epochs: int = _setting(200, int, "training epochs")
    batch_size: int = _setting(16, int, "training batch (over all processes)")
    test_batch_size: int = _setting(3, int, "evaluation batch per process")
    workers: int = _setting(4, int, "data loading processes per training process")
    output_dir: str = _setting("Results", str, "folder for checkpoints and logs")
    weights: str = _setting(
        "", str, "TResNet-L-V2 backbone weights: in21k (the reference's ImageNet-21K-P "
                 "pretraining, timm's copy on the HuggingFace hub, fetched through "
                 "huggingface_hub: HF_HUB_OFFLINE and HF_ENDPOINT apply), in21k_ft_in1k (the same "
                 "fine-tuned on ImageNet-1K), imagenet21k (the publisher's file where a copy is "
                 "cached, else in21k), stanford_cars (the publisher's Cars-fine-tuned file the "
                 "reference used: no longer published, so only a cached or local copy), a URL, or "
                 "a local .pth/.pt/.safetensors file in the published or timm's key names; '' "
                 "starts from random weights (far below the paper)")
    lr: float = _setting(0.002, float, "learning rate of the heads (cosine-annealed per epoch)")
    backbone_lr: float = _setting(0.0002, float, "learning rate of the backbone")
    momentum: float = _setting(0.9, float, "SGD momentum")
    weight_decay: float = _setting(5e-4, float, "SGD weight decay")
    image_size: int = _setting(
        368, int, "training and test crop size in pixels (a multiple of 4, at least 32)")
    resize: int = _setting(421, int, "images are first resized to resize x resize")
    crop_padding: int = _setting(8, int, "padding of the random training crop")
    eval_every: int = _setting(
        0, int, "evaluate every N epochs; 0 keeps the reference schedule (the first 5 epochs and "
                "the second half) and the last epoch")
    val_split: str = _setting(
        "none", parse_val_split,
        "model selection: none (the reference's protocol: best.pt is the epoch best on test), "
        "a fraction such as 0.1 (a stratified, seeded part of train held out for validation) or "
        "folder (data_path/val/<class>/); with either, best.pt is chosen on validation and the "
        "test split is scored once, with best.pt, after the last epoch")
    seed: int = _setting(0, int, "seed of initialisation, data order, augmentation and crop "
                                 "choices")
    device: str = _setting("auto", str, "cuda, cpu, cuda:1, ... (auto: cuda when available)")
    resume: str = _setting(
        "", str, "continue a run: a checkpoint path, or bare --resume for output_dir/last.pt (a "
                 "fresh start when there is none yet)", bare="auto")
    test_only: bool = _setting(
        False, parse_bool, "only evaluate a checkpoint (--resume=PATH, default "
                           "output_dir/best.pt)", bare=True)
    overwrite: bool = _setting(
        False, parse_bool, "start a new run in an output_dir that already holds one (its "
                           "checkpoints, logs, TensorBoard events, evaluation reports, export "
                           "and superseded/ are removed once the new run's data, settings and "
                           "weights are checked)",
        bare=True)
    save_every: int = _setting(
        0, int, "also write last.pt every N iterations inside an epoch (0: epoch ends only)")
    amp: str = _setting("none", str, "mixed precision: none, bf16 or fp16 (fp16 uses a gradient "
                                     "scaler)", choices=AMP_CHOICES)
    channels_last: bool = _setting(False, parse_bool, "channels-last memory format", bare=True)
    compile: bool = _setting(
        False, parse_bool, "torch.compile the network (the first iterations take minutes on a "
                           "GPU; the result is cached for later runs)", bare=True)
    cuda_graph: str = _setting(
        "auto", str, "replay each training iteration and test batch as one CUDA graph: the same "
                     "function, a fraction of the kernel launches, which bound CMAL-Net's speed "
                     "on a GPU. auto: on CUDA in one process without --compile or --amp=fp16; "
                     "true; false (eager, as the reference)", choices=CUDA_GRAPH_CHOICES)
    sgd: str = _setting(
        "foreach", str, "how SGD updates the parameters, the same arithmetic: foreach (few "
                        "kernels), fused (one kernel per group) or loop (per parameter, as the "
                        "reference)", choices=SGD_IMPLS)
    deterministic: bool = _setting(
        False, parse_bool, "reproducible CUDA runs: deterministic cuDNN and CUDA algorithms "
                           "(slower); the CPU always is", bare=True)
    layers: tuple = _setting((3, 4, 23, 3), parse_layers,
                             "TResNet blocks per stage (smaller for quick experiments)")
    width_factor: float = _setting(1.0, float, "TResNet width factor (1.0: TResNet-L-V2)")
    head_mid: int = _setting(512, int, "channels of the first conv of each expert's block")
    head_features: int = _setting(1024, int, "channels of each expert's feature map")
    head_hidden: int = _setting(512, int, "hidden width of each classifier")
    method: str = _setting(
        "cmal", str, "what is trained: cmal (CMAL-Net, the reference's five-step iteration) or "
                     "baseline (plain fine-tuning of the same backbone: global average pooling, "
                     "one linear classifier, one forward and backward per batch)", choices=METHODS)
    ablation: str = _setting(
        "none", str, "a variant of CMAL-Net's iteration: none (the reference's), no_crops (no "
                     "attention crops: every pass on the raw batch) or no_joint_crop (step 5, all "
                     "heads on the joint crop, left out)", choices=ABLATIONS)
    abn: str = _setting(
        "auto", str, "activated batch norm, the same function in three implementations: inplace "
                     "(inplace_abn, least memory), pure (PyTorch, InPlaceABN's rounding), native "
                     "(PyTorch's batch norm in the --amp dtype, fused by --compile) or auto (pure "
                     "on the CPU; on CUDA native with --amp or CUDA graphs, else inplace)",
        choices=ABN_CHOICES)
    skip_bad_images: bool = _setting(
        False, parse_bool, "skip unreadable images with a warning instead of stopping",
        bare=True)
    max_image_pixels: int = _setting(
        89478485, int, "refuse images with more pixels (decompression bombs)")
    check_images: str = _setting(
        "headers", str, "before training, read every image's header (headers: seconds for a "
                        "dataset), decode every image (full) or neither (none)", choices=CHECKS)
    fast_decode: bool = _setting(
        False, parse_bool, "decode large JPEGs at a reduced scale (faster loading; the images "
                           "differ slightly from the reference transform's, see README)",
        bare=True)
    progress: str = _setting(
        "auto", _parse_progress, "progress bars: auto (when the output is a terminal; otherwise "
                                 "only the line per epoch, as in a log file), true or false",
        bare="true")
    threads: int = _setting(
        0, int, "CPU threads of PyTorch in each process (0: PyTorch's choice, one per core; "
                "fewer on a machine shared with other work)")
    tta_flip: bool = _setting(
        False, parse_bool, "--test_only: also score each test image together with its mirror "
                           "image (beyond the paper's protocol, reported apart)", bare=True)
    tensorboard: bool = _setting(
        False, parse_bool, "also write TensorBoard event files into output_dir/tensorboard/ "
                           "(needs the tensorboard package: pip install tensorboard)", bare=True)
    extend: bool = _setting(
        False, parse_bool, "with --resume and --epochs=N: continue a finished run to N epochs, "
                           "N above its own (the cosine schedule is stretched over the new "
                           "total)", bare=True)
    accept_new_holdout: bool = _setting(
        False, parse_bool, "with --resume and --val_split: continue although the validation "
                           "images are not those the checkpoint recorded (images of train, or "
                           "with --val_split=folder of val/, added, removed or renamed); "
                           "without it such a resume stops",
        bare=True)

    def to_dict(self):
        """Plain values (tuples as lists), as checkpoints store them."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_checkpoint(cls, saved):
        """The settings a checkpoint was trained with; settings added since get their
        defaults, and ones this version no longer has are left out."""
        known = {k: v for k, v in saved.items() if k in NAMES}
        if "layers" in known:
            known["layers"] = parse_layers(known["layers"])
        return cls(**known)


NAMES = tuple(f.name for f in dataclasses.fields(Settings))

# What a resumed run may change: where the data is and how it is read, where and how the run
# runs and reports, how often it saves. Each leaves the function computed as it is (foreach and
# loop SGD are the same arithmetic). Every other setting comes from the checkpoint.
CHANGEABLE_ON_RESUME = frozenset({
    "data_path", "workers", "device", "progress", "threads", "resume", "test_only", "overwrite",
    "extend", "tta_flip", "accept_new_holdout",
    "output_dir", "save_every", "check_images", "skip_bad_images", "max_image_pixels",
    "test_batch_size", "deterministic", "sgd", "compile", "cuda_graph"})
# What a run records besides its checkpoints and logs: a resumed run keeps the checkpoint's
# choice unless the command line gives one (it changes nothing computed).
RECORDING = frozenset({"tensorboard"})
# What evaluating a checkpoint takes from it: the network, the images it was trained on, and how
# it was trained (named in the printout).
EVALUATED_AS_TRAINED = frozenset({
    "num_classes", "layers", "width_factor", "head_mid", "head_features", "head_hidden",
    "image_size", "resize", "method", "ablation"})


def cuda_graph_excluded(cfg):
    """What in these settings rules out CUDA graphs ('' when nothing does): fp16's gradient
    scaler and several processes synchronise with the host inside an iteration, and
    --compile captures its own graphs."""
    if cfg.amp == "fp16":
        return "--amp=fp16 (its gradient scaler reads the gradients on the host)"
    if cfg.compile:
        return "--compile"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "several processes (torchrun)"
    if cfg.device.startswith("cpu"):
        return f"--device={cfg.device}"
    return ""


def use_cuda_graph(cfg, device):
    """Whether a run on `device` replays its iterations and test batches as CUDA graphs."""
    if cfg.cuda_graph == "false" or device.type != "cuda":
        return False
    return not cuda_graph_excluded(cfg)


def given_on_command_line(argv):
    """The names of the settings an argv gives explicitly (not by default or a script's block)."""
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    add_arguments(parser, defaults=dict.fromkeys(NAMES, argparse.SUPPRESS))
    namespace, _ = parser.parse_known_args(argv)
    return set(vars(namespace))


def from_checkpoint_for(cfg, saved, given, path, evaluation=False, stopped_in=None):
    """`cfg` with the settings a checkpoint decides: all but CHANGEABLE_ON_RESUME (and RECORDING
    settings given on the command line) when resuming, EVALUATED_AS_TRAINED when evaluating. A
    command-line value that contradicts the checkpoint is refused naming both; a default or
    script value is replaced, and named in the returned notes. --epochs may grow with --extend
    once the run is finished; `stopped_in`: where an unfinished run stopped (as "the end of
    epoch 2"), whose refusal says to finish it first."""
    saved = Settings.from_checkpoint(saved)
    decided = EVALUATED_AS_TRAINED if evaluation else set(NAMES) - CHANGEABLE_ON_RESUME
    if not evaluation:
        decided = decided - (RECORDING & set(given))
    if not evaluation and cfg.extend:
        decided = decided - {"epochs"}
    conflicts, notes = [], []
    for name in sorted(decided):
        now, then = getattr(cfg, name), getattr(saved, name)
        if now == then:
            continue
        if name in given:
            conflicts.append(f"--{name}={_show(now)} (it was trained with {_show(then)})")
        else:
            notes.append(f"{name}={_show(then)}")
    if conflicts:
        hint = ""
        if any(c.startswith("--epochs=") for c in conflicts):
            # --extend refuses an unfinished run: saying "add --extend" would send the user to
            # a second refusal.
            hint = (" To train a finished run for more epochs, add --extend." if stopped_in is None
                    else f" The run stopped at {stopped_in} (of {saved.epochs} epochs): finish it "
                    "with --resume alone; then --resume --extend --epochs=N (N above "
                    f"{saved.epochs}) trains it further.")
        raise SettingsError(f"{path} holds a run whose settings these options contradict: "
                            + "; ".join(conflicts) + ". Leave them out to continue as it was "
                            "trained, or start a new run in another --output_dir." + hint)
    return dataclasses.replace(cfg, **{n: getattr(saved, n) for n in decided}), notes


def _show(value):
    """A setting's value as a command line would give it; an empty one as ''."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return "''" if value == "" else value


def closest(name, prefix=""):
    """' (did you mean PREFIXx?)' for the valid setting x nearest to a misspelt `name`, or ''."""
    match = [n for n in NAMES if n.startswith(name)] or difflib.get_close_matches(name, NAMES, 1)
    return f" (did you mean {' or '.join(prefix + m for m in match[:3])}?)" if match else ""


def check_names(values, where):
    """Refuse any name of `values` that is no setting, suggesting the closest one."""
    unknown = sorted(set(values) - set(NAMES))
    if unknown:
        raise SettingsError(f"{where}: unknown setting"
                            + "; ".join(f" {name!r}{closest(name)}" for name in unknown)
                            + ". Valid settings: python train.py --help")


def add_arguments(parser, names=NAMES, defaults=None):
    """Add --name options of these settings to an argparse parser, with these defaults."""
    defaults = defaults or {}
    for f in dataclasses.fields(Settings):
        if f.name not in names:
            continue
        meta = f.metadata
        default = defaults.get(f.name, f.default)
        option = dict(type=meta["parse"], default=default, help=meta["help"])
        if meta["choices"]:
            option["choices"] = meta["choices"]
        if meta["bare"] is not None:
            option.update(nargs="?", const=meta["bare"])
        parser.add_argument(f"--{f.name}", **option)


def parse(defaults=None, argv=None, description=None):
    """Settings: the defaults of Settings, then the caller's `defaults` (a dataset script's
    block), then the command line; checked by `validate`."""
    defaults = dict(defaults or {})
    check_names(defaults, "settings")
    if "layers" in defaults:
        defaults["layers"] = parse_layers(defaults["layers"])
    defaults = _parse_block_numbers(defaults)
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, defaults=defaults)
    namespace, unknown = parser.parse_known_args(argv)
    if unknown:
        option = unknown[0].split("=")[0]
        parser.error(f"unrecognized option {option}{closest(option.lstrip('-'), '--')}")
    cfg = Settings(**vars(namespace))
    problems = validate(cfg)
    if problems:
        parser.error("; ".join(problems))
    return cfg


def _parse_block_numbers(block):
    """A settings block's numbers and booleans read as the command line reads their text.
    argparse converts only string defaults: `batch_size = 16.0` would reach the data loader as
    a float and fail there, and `val_split = 0.1` differ on resume from --val_split=0.1."""
    parsers = {f.name: f.metadata["parse"] for f in dataclasses.fields(Settings)}
    parsed = dict(block)
    for name, value in block.items():
        if isinstance(value, (bool, int, float)):
            try:
                parsed[name] = parsers[name](str(value))
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise SettingsError(f"the settings block sets {name} = {value!r}, not a valid "
                                    f"value of {name} ({exc}); correct it in the script") \
                    from None
    return parsed


def from_script(script_globals):
    """The settings block of a dataset script: its global names, less modules, functions and
    Python's own; every other name must be a setting."""
    import types
    block = {k: v for k, v in script_globals.items()
             if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType,
                                                             type))}
    check_names(block, f"the settings block of {script_globals.get('__file__', 'the script')}")
    return block


def _inside(path, folder):
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return os.path.commonpath([path, folder]) == folder


def validate(cfg):
    """What is wrong with a set of settings, one message per problem naming the option."""
    problems = []
    if not cfg.data_path:
        problems.append("--data_path is required (or set data_path in the script's settings)")
    if not cfg.output_dir:
        # An unset shell variable (--output_dir=$OUT) gives ''; the run would scatter its
        # checkpoints and logs among the files of the current folder.
        problems.append("--output_dir is empty (an unset shell variable?); name the folder for "
                        "the run's checkpoints and logs, e.g. --output_dir=Results")
    if len(cfg.layers) != 4 or min(cfg.layers) < 1:
        problems.append(f"--layers must be four positive integers, got {cfg.layers}")
    for name in ("epochs", "batch_size", "test_batch_size", "image_size", "resize",
                 "max_image_pixels", "head_mid", "head_features", "head_hidden"):
        if getattr(cfg, name) < 1:
            problems.append(f"--{name} must be positive, got {getattr(cfg, name)}")
    for name in ("lr", "backbone_lr", "momentum", "weight_decay", "width_factor"):
        if not math.isfinite(getattr(cfg, name)):
            problems.append(f"--{name} must be a finite number, got {getattr(cfg, name)}")
    if math.isfinite(cfg.width_factor) and int(64 * cfg.width_factor) < 1:
        problems.append(f"--width_factor must be at least 1/64 (the first stage keeps "
                        f"int(64 x width_factor) channels; 1.0 is TResNet-L-V2), got "
                        f"{cfg.width_factor}")
    if cfg.momentum >= 1:
        problems.append(f"--momentum must be below 1 (0.9 in the paper; at 1 or above the "
                        f"updates grow without bound), got {cfg.momentum}")
    if not -2 ** 63 <= cfg.seed < 2 ** 64:
        problems.append(f"--seed must fit in 64 bits (-2**63 to 2**64 - 1), got {cfg.seed}")
    if cfg.batch_size == 1:
        problems.append("--batch_size must be at least 2 (the classifiers' BatchNorm1d needs two "
                        "samples)")
    if cfg.image_size % 4 or cfg.image_size < 32:
        problems.append(f"--image_size must be a multiple of 4 and at least 32 (368 in the "
                        f"paper), got {cfg.image_size}")
    if cfg.resize < cfg.image_size:
        problems.append(f"--resize ({cfg.resize}) must be at least --image_size "
                        f"({cfg.image_size})")
    if cfg.crop_padding >= cfg.image_size:
        # Wider padding lets most random crops fall wholly in it: blank images with a label,
        # which end in a non-finite loss that would be blamed on --lr.
        problems.append(f"--crop_padding ({cfg.crop_padding}) must be below --image_size "
                        f"({cfg.image_size}), or a random crop can hold no image at all (8 in "
                        "the paper)")
    if cfg.abn == "inplace":
        from cmal.tresnet.abn import inplace_abn_available
        if not inplace_abn_available():
            problems.append("--abn=inplace but inplace_abn is not installed (make setup builds "
                            "it); use --abn=auto")
    if cfg.num_classes is not None and cfg.num_classes < 2:
        problems.append(f"--num_classes must be at least 2, got {cfg.num_classes}")
    for name in ("workers", "eval_every", "save_every", "threads", "crop_padding", "lr",
                 "backbone_lr", "momentum", "weight_decay"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name} cannot be negative, got {getattr(cfg, name)}")
    for name, choices in (("method", METHODS), ("ablation", ABLATIONS)):
        if getattr(cfg, name) not in choices:
            problems.append(f"--{name} must be one of {', '.join(choices)}, got "
                            f"{getattr(cfg, name)!r}")
    for name in ("data_path", "output_dir", "resume", "weights"):
        value = getattr(cfg, name) or ""
        if value.startswith("~"):
            problems.append(f"--{name}={value} starts with ~, which the shell does not expand "
                            f"after '=': write --{name} {value} (with a space) or use $HOME")
    split = next((s for s in ("train", "test", "val") if cfg.data_path and
                  _inside(cfg.output_dir, os.path.join(cfg.data_path, s))), None)
    if split:
        problems.append(f"--output_dir={cfg.output_dir} lies inside the {split} split of "
                        f"--data_path={cfg.data_path}, where its pictures would be read as "
                        "images of a class; choose a folder outside the splits")
    if cfg.tta_flip and not cfg.test_only:
        problems.append("--tta_flip scores mirror images when evaluating a checkpoint "
                        "(--test_only); a training run does not use it: leave it out")
    if cfg.method in REGISTRY and cfg.ablation not in REGISTRY[cfg.method].ablations:
        problems.append(f"--ablation={cfg.ablation} varies CMAL-Net's iteration; the "
                        f"{cfg.method} has none (leave --ablation out with --method={cfg.method})")
    if cfg.extend and not cfg.resume and not cfg.test_only:
        problems.append("--extend continues a finished run and needs --resume (its output_dir's "
                        "last.pt) or --resume=PATH; add one, or leave out --extend to start a "
                        "new run")
    if cfg.cuda_graph == "true":
        why = cuda_graph_excluded(cfg)
        if why:
            problems.append(f"--cuda_graph=true cannot be used with {why}: leave it at auto or "
                            "false")
    if cfg.tensorboard:
        from cmal.tensorboard import tensorboard_writer_class
        try:
            tensorboard_writer_class()
        except UserError as exc:
            problems.append(str(exc))
    return problems
