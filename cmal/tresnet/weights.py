"""TResNet-L-V2 weights for the backbone, from every source a user has: a named source (the
HuggingFace hub copies of the pretraining, or the publisher's files where a copy is cached), a
URL, or a local file (safetensors, or torch files read without running code) in the published
key names or timm's. Anything else is refused, naming what the file holds, before the model is
touched; a successful load returns a record of what initialised the network (init_lines)."""
import difflib
import hashlib
import http.client
import os
import pickle
import tempfile
import time
import urllib.error
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from cmal.errors import WeightsError
from cmal.tresnet import hub

# The publisher's files (Alibaba-MIIL). Both links answer 403 Forbidden since 2026-05
# (Alibaba-MIIL/TResNet issue #57); a copy already in the cache (cache_dir) is still used.
PUBLISHED_WEIGHTS = {
    "stanford_cars": "https://miil-public-eu.oss-eu-central-1.aliyuncs.com/model-zoo/tresnet/"
                     "stanford_cars_tresnet-l-v2_96_27.pth",
    "imagenet21k": "https://miil-public-eu.oss-eu-central-1.aliyuncs.com/model-zoo/ImageNet_21K_P/"
                   "models/tresnet_l_v2_miil_21k.pth",
}
# timm's copies on the HuggingFace hub (repository, file): converted from the publisher's files
# by timm's checkpoint_filter_fn, so in timm's key names (layouts.from_timm_names).
HUB_WEIGHTS = {
    "in21k": ("timm/tresnet_v2_l.miil_in21k", "model.safetensors"),
    "in21k_ft_in1k": ("timm/tresnet_v2_l.miil_in21k_ft_in1k", "model.safetensors"),
}
# A publisher's name whose network the hub holds too: used when no copy is cached.
HUB_COPY_OF = {"imagenet21k": "in21k"}
WEIGHT_NAMES = tuple(HUB_WEIGHTS) + tuple(PUBLISHED_WEIGHTS)
PUBLISHER_GONE = ("the publisher's link answers 403 Forbidden since 2026-05 "
                  "(Alibaba-MIIL/TResNet issue #57)")
CACHE_ENV = "CMAL_CACHE"
HEAD_PREFIX = "head.fc."
_LIST_LIMIT = 12
# What a run without --weights records, and init_lines turns into its warning.
RANDOM_INIT = {"source": "random"}
LOCAL_FILE = "a local file"  # the origin of a --weights path


class NotTorchFileError(WeightsError):
    """A file that is no PyTorch file at all (a log, a picture, an empty file)."""


class DownloadError(WeightsError):
    """A URL that could not be fetched; `reason` says why in a few words (HTTP 403 Forbidden)."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


def cache_dir():
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cmal"
    return Path(os.environ.get(CACHE_ENV, default))


def _is_url(source):
    return str(source).startswith(("http://", "https://"))


# The whole transfer's limit: the published files are 180-400 MB, minutes on a slow link.
DOWNLOAD_DEADLINE = 3600.0


class _DeadlineExceeded(TimeoutError):
    pass


def cache_name(url):
    """The cache entry of a URL: its file name, prefixed by a hash of the whole URL, so that two
    URLs that end in the same name never share an entry."""
    name = Path(urllib.request.urlparse(url).path).name or "weights.pth"
    return f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{name}"


def download(url, dest_dir=None, timeout=30.0, progress=True, deadline=DOWNLOAD_DEADLINE):
    """Download `url` into the cache once and return the local path.

    `timeout` bounds each network read and `deadline` the whole transfer (seconds). The file is
    written under a temporary name and renamed only when complete, so an interrupted or too slow
    download never becomes a cache entry.
    """
    dest_dir = Path(dest_dir) if dest_dir is not None else cache_dir()
    dest = dest_dir / cache_name(url)
    if dest.is_file():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    hint = (f"Download it on a machine with internet access and pass the local file instead "
            f"(e.g. --weights=/path/{dest.name}), or copy it to {dest}.")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=dest.name, suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    written = _copy_with_progress(response, f, total, dest.name, progress,
                                                  time.monotonic() + deadline)
                if total is not None and written != total:
                    reason = f"the connection ended after {written} of {total} bytes"
                    raise DownloadError(f"could not download {url}: {reason}; try again. {hint}",
                                        reason)
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except _DeadlineExceeded as exc:
        raise DownloadError(f"could not download {url}: {exc}. {hint}", str(exc)) from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as exc:
        reason = (f"HTTP {exc.code} {exc.reason}" if isinstance(exc, urllib.error.HTTPError)
                  else getattr(exc, "reason", exc))
        raise DownloadError(f"could not download {url}: {reason}. {hint}", str(reason)) from None
    return dest


def _copy_with_progress(src, dst, total, name, progress, deadline):
    from tqdm import tqdm
    start = time.monotonic()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {name}",
              disable=not progress) as bar:
        written = 0
        # read1: what has arrived (up to 1 MiB), so that a server trickling bytes cannot hold
        # one read past the deadline.
        while chunk := src.read1(1 << 20):
            dst.write(chunk)
            written += len(chunk)
            bar.update(len(chunk))
            if time.monotonic() > deadline:
                raise _DeadlineExceeded(
                    f"{written} bytes{f' of {total}' if total else ''} arrived in "
                    f"{time.monotonic() - start:.0f} s, past the download deadline of "
                    f"{deadline - start:.0f} s")
    return written


def read_checkpoint(path):
    """torch.load with weights_only=True, turning every failure into a WeightsError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist; check the path (or pass a URL)")
    if not _looks_like_torch_file(path):
        raise NotTorchFileError(f"{path} is not a PyTorch file (neither the zip archive "
                                "torch.save writes nor a pickle); pass a .pt/.pth file written "
                                "by torch.save")
    try:
        with warnings.catch_warnings():  # the error below says what a protocol warning would
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError,
            OSError) as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path, exc):
    """Why torch's safe loader refused `path`: it would run code, it is a whole pickle in a form
    the safe loader does not read, or it is truncated or corrupt."""
    imports, complete = pickle_imports(path)
    code = [name for name in imports if not _plain_data(name)]
    # The safe unpickler names a class or function it will not run (GLOBAL); it stops earlier,
    # at an opcode it does not know, on pickles of protocol 4 and above.
    if code or "GLOBAL" in str(exc):
        return WeightsError(
            f"{path} holds Python objects other than tensors and plain containers"
            + (f" ({_listing(code)})" if code else "") + "; it is refused because unpickling it "
            "could run arbitrary code. Re-save its state_dict with "
            "torch.save(model.state_dict(), ...) from a trusted environment.")
    if complete and isinstance(exc, pickle.UnpicklingError):
        return WeightsError(
            f"{path} is a complete pickle of tensors that torch's safe loader cannot read "
            f"({_reason(exc)}), as pickle.dump or torch.save(..., pickle_protocol=4) write; "
            "re-save it with torch.save(obj, path) at its default protocol")
    return WeightsError(f"{path} is not a readable PyTorch file ({_reason(exc)}); it may be "
                        "truncated or corrupt: download or copy it again")


def _reason(exc):
    """The line of a loader's message that says what failed (torch's run to many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return next((line for line in lines if "Unsupported" in line or "GLOBAL" in line),
                lines[0] if lines else type(exc).__name__)


# What torch.save's pickles name besides tensors' own rebuilders: nothing that runs code.
_PLAIN_BUILTINS = {"set", "frozenset", "bytearray", "complex", "slice", "range"}


def _plain_data(name):
    module, _, attr = name.rpartition(".")
    root = module.split(".")[0]
    return root in ("torch", "collections", "_codecs") or \
        (module in ("builtins", "__builtin__") and attr in _PLAIN_BUILTINS)


def pickle_imports(path):
    """(the module.name of every class or function the pickles of a torch file import, whether at
    least one pickle is complete), read without running any of it: a zip archive's data.pkl, or
    the pickles at the start of a legacy file. Names that cannot be made out are ''."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return [], False
                with archive.open(name) as stream:
                    return _scan_pickles(stream)
        with open(path, "rb") as stream:
            return _scan_pickles(stream)
    except (OSError, zipfile.BadZipFile, ValueError, EOFError, RuntimeError):
        return [], False


def _scan_pickles(stream):
    import pickletools
    found, complete, memo, strings = [], False, {}, []
    try:
        while True:  # a legacy file holds several pickles, then raw tensor data
            for op, arg, _ in pickletools.genops(stream):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif name == "STACK_GLOBAL":  # module and name are the last two strings pushed
                    found.append(".".join(str(s) for s in strings[-2:] if s))
                elif name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[arg] = strings[-1] if strings else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    strings.append(memo.get(arg))
                elif isinstance(arg, str):
                    strings.append(arg)
            complete = True
    except (ValueError, EOFError, UnicodeDecodeError, OverflowError, MemoryError):
        pass  # the end of the pickles, or where the file is damaged
    return found, complete


def _looks_like_torch_file(path):
    with open(path, "rb") as f:
        head = f.read(4)
    # The start of torch.save's zip archive (a truncated one too), or of a legacy pickle
    # (protocol 2 or later)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


def _looks_like_safetensors(path):
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and \
        int.from_bytes(head[:8], "little") < os.path.getsize(path)


def read_safetensors(path):
    """The tensors of a .safetensors file: plain data, read without unpickling anything."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not a readable safetensors file ({exc}); it may be "
                           "truncated or corrupt: download or copy it again") from None


def read_weights(path):
    """The tensor dict of a weight file: a safetensors file, or a torch file (weights_only) holding
    a state dict bare or under 'model' / 'state_dict'; 'module.' prefixes removed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file {path} does not exist; check the path (or pass a URL, or "
                           f"one of the names {', '.join(WEIGHT_NAMES)})")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return _without_module_prefix(read_safetensors(path))
    if not _looks_like_torch_file(path):
        raise WeightsError(f"{path} is neither a PyTorch file (the zip archive torch.save writes, "
                           "or a pickle) nor a safetensors file; pass a .pth/.pt or .safetensors "
                           "file of TResNet-L-V2 weights")
    return extract_state_dict(read_checkpoint(path), str(path))


def extract_state_dict(obj, source="<weights>"):
    """The tensor dict of a checkpoint: bare, or under 'model' or 'state_dict'."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise WeightsError(f"{source} holds no state dict: expected a dict of tensors, bare or under "
                           "'model' or 'state_dict'")
    return _without_module_prefix(obj)


def _without_module_prefix(state):
    # Checkpoints saved from nn.DataParallel / DDP prefix every key with 'module.'.
    if all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _listing(keys):
    keys = list(keys)
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _LIST_LIMIT else "")


def check_compatible(model_state, state, source, ignore_prefixes=(), what="",
                     fix="It is not a TResNet-L-V2 file of this configuration; check --weights."):
    """Raise WeightsError naming missing, unexpected and mis-shaped keys (outside ignore_prefixes);
    `what`, when given, says first which network the file holds and which one was expected;
    `fix` ends the message."""
    def kept(keys):
        return [k for k in keys if not k.startswith(tuple(ignore_prefixes))]
    missing = kept(k for k in model_state if k not in state)
    unexpected = kept(k for k in state if k not in model_state)
    mis_shaped = [f"{k} (file {tuple(state[k].shape)}, model {tuple(model_state[k].shape)})"
                  for k in kept(model_state) if k in state and state[k].shape != model_state[k].shape]
    if missing or unexpected or mis_shaped:
        parts = [f"{source} does not fit this network" + (f": {what}" if what else "")]
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if mis_shaped:
            parts.append(f"shape mismatches: {_listing(mis_shaped)}")
        parts.append(fix)
        raise WeightsError("; ".join(parts))


@dataclass
class Resolved:
    """Where a --weights value leads: the local file, where it came from, and a line to print
    when the source was replaced by an equivalent one."""
    path: Path
    origin: str
    note: str = ""


def resolve_source(source, timeout=30.0, progress=True):
    """The local file of a --weights value: a name of HUB_WEIGHTS (fetched through
    huggingface_hub), a name of PUBLISHED_WEIGHTS (its cached copy, else the publisher's link, or
    for imagenet21k the hub's copy of the same file), a URL (downloaded once into cache_dir()),
    or a path."""
    source = str(source)
    if source in HUB_WEIGHTS:
        repo_id, filename = HUB_WEIGHTS[source]
        return Resolved(hub.fetch(repo_id, filename, source),
                        f"the HuggingFace hub's {repo_id}")
    if source in PUBLISHED_WEIGHTS:
        return _resolve_published(source, timeout, progress)
    if _is_url(source):
        return Resolved(download(source, timeout=timeout, progress=progress), source)
    path = Path(source)
    if not path.exists() and "/" not in source and not path.suffix:
        close = difflib.get_close_matches(source, WEIGHT_NAMES, 1)
        raise WeightsError(f"--weights={source} is no file and no known name"
                           + (f" (did you mean {close[0]}?)" if close else "")
                           + f"; the names are {', '.join(WEIGHT_NAMES)}; or pass a file path "
                           "or a URL")
    return Resolved(path, LOCAL_FILE)


def _resolve_published(name, timeout, progress):
    url = PUBLISHED_WEIGHTS[name]
    cached = cache_dir() / cache_name(url)
    if cached.is_file():
        return Resolved(cached, f"the publisher's {url}, cached")
    if name in HUB_COPY_OF:
        # The publisher's link is gone; the hub holds the very same network (timm's conversion).
        try:
            resolved = resolve_source(HUB_COPY_OF[name], timeout, progress)
        except WeightsError as exc:
            raise WeightsError(f"--weights={name}: {PUBLISHER_GONE}, so its copy on the "
                               f"HuggingFace hub was tried: {exc}") from None
        resolved.note = (f"--weights={name}: {PUBLISHER_GONE}; using the same pretraining from "
                         f"{resolved.origin} (--weights={HUB_COPY_OF[name]})")
        return resolved
    try:
        return Resolved(download(url, timeout=timeout, progress=progress), url)
    except DownloadError as exc:
        raise WeightsError(_unavailable_message(name, url, exc.reason, cached)) from None


def _unavailable_message(name, url, reason, cached):
    filename = Path(urllib.request.urlparse(url).path).name
    return (f"--weights={name}: {filename} is published only by its authors, and {PUBLISHER_GONE}; "
            f"this attempt: {reason}. Use --weights=in21k instead (the ImageNet-21K-P pretraining "
            f"of the same network, from the HuggingFace hub), or, with a copy of the file, pass "
            f"--weights=/path/to/{filename} (or copy it to {cached})")


def resolve_weights(source, timeout=30.0, progress=True):
    """A local path for `source`: a path, a URL, or a name of WEIGHT_NAMES."""
    return resolve_source(source, timeout, progress).path


def file_digest(path):
    """(size in bytes, sha256 hex digest) of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return Path(path).stat().st_size, digest.hexdigest()


def backbone_state(model_state, state, source, load_head=True):
    """What of a file's tensors (published or timm names) goes into a TResNet whose state dict is
    `model_state`: (the entries to load, the file's entries left out, the number of
    num_batches_tracked counters filled in, whether the file used timm's names). Refuses, naming
    what the file holds, anything that is not this network; touches no model."""
    from cmal.tresnet import layouts
    timm_names = layouts.has_timm_names(state)
    if timm_names:
        state, negative = layouts.from_timm_names(state)
        if negative:
            raise WeightsError(
                f"{source} (timm's key names) holds negative batch-norm scales ({len(negative)} "
                f"layers, e.g. {negative[0]}); TResNet's ABN scales by |w| + 1e-5 and cannot "
                "compute that network. It was trained in timm, not converted from the published "
                "TResNet files: use --weights=in21k or a published file.")
    head_fits = load_head and all(k in state and state[k].shape == v.shape
                                  for k, v in model_state.items() if k.startswith(HEAD_PREFIX))
    state, filled = _with_counters(state, model_state)
    what = (f"it holds the weights of {layouts.describe(state)}, and this backbone is "
            f"{layouts.describe(model_state)}. --weights takes TResNet-L-V2 weights: "
            f"{', '.join(WEIGHT_NAMES)}, or a file of that network (published or timm's key names)")
    check_compatible(model_state, state, source, () if head_fits else (HEAD_PREFIX,), what)
    left_out = [] if head_fits else sorted(k for k in state if k.startswith(HEAD_PREFIX))
    return ({k: v for k, v in state.items() if k not in left_out}, left_out, len(filled),
            timm_names)


def _with_counters(state, model_state):
    """`state` with the num_batches_tracked counters it lacks set to 0, and their names.
    timm's converted files and the publisher's have none (inplace-abn fills them in on load);
    with ABN's fixed momentum they change nothing computed."""
    suffix = "num_batches_tracked"
    filled = [k for k in model_state if k.endswith(suffix) and k not in state
              and k[:-len(suffix)] + "running_mean" in state]
    return {**state, **{k: torch.zeros((), dtype=torch.long) for k in filled}}, filled


def load_backbone(model, source, load_head=True, timeout=30.0, progress=True):
    """Load TResNet-L-V2 weights (see resolve_source) into `model`; return the record of what
    initialised it: source, origin, path, bytes, sha256, key_names, loaded, left_out, filled and
    a note (init_lines prints it; runs save it in settings.json and their checkpoints).

    `load_head`: also load `head.fc.*` when its shape fits (another class count never does).
    Anything else that does not fit is refused before anything is copied, so a failed load
    leaves the model untouched."""
    resolved = resolve_source(source, timeout=timeout, progress=progress)
    path = resolved.path
    try:
        state = read_weights(path)
    except WeightsError as exc:
        if resolved.origin != LOCAL_FILE:  # a downloaded copy: say which file to delete
            raise WeightsError(f"{exc} (this is the cached download of --weights={source}: "
                               "delete it to download it again)") from None
        raise
    state, left_out, filled, timm_names = backbone_state(model.state_dict(), state, str(path),
                                                         load_head)
    model.load_state_dict(state, strict=False)
    size, sha256 = file_digest(path)
    return {"source": str(source), "origin": resolved.origin, "path": str(path), "bytes": size,
            "sha256": sha256, "key_names": "timm" if timm_names else "published",
            "loaded": len(state) - filled, "left_out": left_out, "filled": filled,
            "note": resolved.note}


def load_tresnet_weights(model, source, timeout=30.0, progress=True, load_head=True):
    """Load TResNet-L-V2 weights into `model` and return the model (load_backbone returns the
    record instead)."""
    load_backbone(model, source, load_head=load_head, timeout=timeout, progress=progress)
    return model


def init_lines(record):
    """The lines a run prints first about what initialised its network: the file, its size and
    sha256 prefix, what was loaded and left out; a warning for random initialisation; and a
    line for a checkpoint written before runs recorded it (`record` None)."""
    if record is None:
        return ["initialisation: not recorded (the checkpoint was written before runs recorded "
                "it)"]
    if record.get("source") == "random":
        return ["WARNING: random initialisation: no --weights, so this run's network starts from "
                "random weights, not pretrained ones, and its accuracy will be far below the "
                "paper's; use --weights=in21k (the reference's ImageNet-21K-P pretraining)"]
    lines = [record["note"]] if record.get("note") else []
    names = "timm's key names, mapped to the published ones" if record["key_names"] == "timm" \
        else "the published key names"
    where = record["origin"] if record["origin"] == LOCAL_FILE else \
        f"{record['origin']}, file {record['path']}"
    lines.append(f"initialised from --weights={record['source']}: {where} "
                 f"({record['bytes'] / 1e6:.1f} MB, sha256 {record['sha256'][:12]}); {names}")
    left_out = ", ".join(record["left_out"]) or "nothing"
    filled = (f"; {record['filled']} num_batches_tracked counters the file lacks set to 0"
              if record["filled"] else "")
    lines.append(f"initialisation: {record['loaded']} tensors loaded; left out: {left_out}"
                 + (" (the file's classifier; this network's heads start new)"
                    if record["left_out"] else "") + filled)
    return lines
