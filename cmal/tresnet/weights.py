"""Reading published TResNet-L-V2 weight files safely, and fetching them once into a cache."""
import hashlib
import http.client
import os
import pickle
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import torch

from cmal.errors import UserError

PUBLISHED_WEIGHTS = {
    "stanford_cars": "https://miil-public-eu.oss-eu-central-1.aliyuncs.com/model-zoo/tresnet/"
                     "stanford_cars_tresnet-l-v2_96_27.pth",
    "imagenet21k": "https://miil-public-eu.oss-eu-central-1.aliyuncs.com/model-zoo/ImageNet_21K_P/"
                   "models/tresnet_l_v2_miil_21k.pth",
}
CACHE_ENV = "CMAL_CACHE"
HEAD_PREFIX = "head.fc."
_LIST_LIMIT = 12


class WeightsError(UserError, RuntimeError):
    """A weight file that cannot be used: missing, unreadable, unsafe or of another architecture."""


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
                    raise WeightsError(f"could not download {url}: the connection ended after "
                                       f"{written} of {total} bytes; try again. {hint}")
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    except _DeadlineExceeded as exc:
        raise WeightsError(f"could not download {url}: {exc}. {hint}") from None
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise WeightsError(f"could not download {url}: {reason}. {hint}") from None
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
        raise WeightsError(f"{path} is not a PyTorch file (neither the zip archive torch.save "
                           "writes nor a pickle); pass a .pt/.pth file written by torch.save")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" in str(exc):  # the safe unpickler met a class or function it will not run
            raise WeightsError(
                f"{path} holds Python objects other than tensors and plain containers; it is refused "
                "because unpickling it could run arbitrary code. Re-save its state_dict with "
                "torch.save(model.state_dict(), ...) from a trusted environment.") from None
        raise WeightsError(f"{path} is not a readable PyTorch file ({exc}); it may be truncated or "
                           "corrupt: download or copy it again") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise WeightsError(f"{path} is not a readable PyTorch file ({exc}); it may be truncated or "
                           "corrupt: download or copy it again") from None


def _looks_like_torch_file(path):
    with open(path, "rb") as f:
        head = f.read(4)
    # The start of torch.save's zip archive (a truncated one too), or of a legacy pickle
    # (protocol 2 or later)
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


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
    # Checkpoints saved from nn.DataParallel / DDP prefix every key with 'module.'.
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _listing(keys):
    keys = list(keys)
    shown = ", ".join(keys[:_LIST_LIMIT])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _LIST_LIMIT else "")


def check_compatible(model_state, state, source, ignore_prefixes=()):
    """Raise WeightsError naming missing, unexpected and mis-shaped keys (outside ignore_prefixes)."""
    def kept(keys):
        return [k for k in keys if not k.startswith(tuple(ignore_prefixes))]
    missing = kept(k for k in model_state if k not in state)
    unexpected = kept(k for k in state if k not in model_state)
    mis_shaped = [f"{k} (file {tuple(state[k].shape)}, model {tuple(model_state[k].shape)})"
                  for k in kept(model_state) if k in state and state[k].shape != model_state[k].shape]
    if missing or unexpected or mis_shaped:
        parts = [f"{source} does not fit this network"]
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        if mis_shaped:
            parts.append(f"shape mismatches: {_listing(mis_shaped)}")
        parts.append("It is not a TResNet-L-V2 file of this configuration; check --weights.")
        raise WeightsError("; ".join(parts))


def resolve_weights(source, timeout=30.0, progress=True):
    """A local path for `source`: a path, a URL, or a name of PUBLISHED_WEIGHTS."""
    source = PUBLISHED_WEIGHTS.get(str(source), source)
    if _is_url(source):
        return download(str(source), timeout=timeout, progress=progress)
    return Path(source)


def load_tresnet_weights(model, source, timeout=30.0, progress=True):
    """Load a published TResNet-L-V2 file (path, URL or published name) into `model`.

    `head.fc.*` is skipped when its shape differs (another class count); any other mismatch is
    refused before anything is copied, so a failed load leaves the model untouched.
    """
    path = resolve_weights(source, timeout=timeout, progress=progress)
    try:
        state = extract_state_dict(read_checkpoint(path), str(path))
    except WeightsError as exc:
        if str(path) != str(source):  # a downloaded copy: say which file to delete
            raise WeightsError(f"{exc} (this is the cached download of {source}: delete it to "
                               "download it again)") from None
        raise
    model_state = model.state_dict()
    head_fits = all(k in state and state[k].shape == v.shape
                    for k, v in model_state.items() if k.startswith(HEAD_PREFIX))
    ignore = () if head_fits else (HEAD_PREFIX,)
    check_compatible(model_state, state, str(path), ignore_prefixes=ignore)
    if not head_fits:
        state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    model.load_state_dict(state, strict=False)
    return model
