"""Weight files from the HuggingFace hub, fetched through huggingface_hub: its cache (shared with
timm, so a file timm fetched is not fetched again), HF_HUB_OFFLINE, HF_ENDPOINT mirrors,
resumable transfers and its progress bars.

huggingface_hub reads HF_HUB_CACHE, HF_HUB_OFFLINE and HF_ENDPOINT once, when it is imported;
this module reads them when a file is asked for and passes them explicitly, so that what the
environment says at that moment is what is used.
"""
import os
import socket
import urllib.parse
from pathlib import Path

from cmal.errors import WeightsError

DEFAULT_ENDPOINT = "https://huggingface.co"
# A direct connection to the endpoint, tried before a download: huggingface_hub retries an
# unreachable host five times (about 25 s) before giving up.
PROBE_TIMEOUT = 5.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY",
                    "all_proxy")


def _is_true(value):
    return str(value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def cache_dir():
    """The hub cache huggingface_hub would use under the current environment."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(os.path.expandvars(explicit)).expanduser()
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def offline():
    from huggingface_hub import constants
    return (_is_true(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE"))
            or constants.HF_HUB_OFFLINE)


def endpoint():
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def _local_file_hint(repo_id, filename):
    return (f"On a machine with internet access, download {filename} of {repo_id} "
            f"(`hf download {repo_id} {filename}`, or from {DEFAULT_ENDPOINT}/{repo_id}) and pass "
            f"it with --weights=/path/to/{filename}, or copy that machine's hub cache "
            f"(models--{repo_id.replace('/', '--')}) into {cache_dir()}")


def fetch(repo_id, filename, setting):
    """The local path of `filename` of the hub repository `repo_id`: from the hub cache when it is
    there (no network), else downloaded into it. `setting`: the --weights value, for messages.
    Offline or unreachable, a WeightsError names the repository, HF_HUB_OFFLINE / HF_ENDPOINT,
    and how to pass a local copy instead."""
    cached = _from_cache(repo_id, filename)
    if cached is not None:
        return cached
    where = f"--weights={setting}: {filename} of the HuggingFace hub repository {repo_id}"
    hint = _local_file_hint(repo_id, filename)
    if offline():
        raise WeightsError(f"{where} is not in the hub cache {cache_dir()}, and HF_HUB_OFFLINE is "
                           f"set, which forbids downloading it. Unset HF_HUB_OFFLINE to download "
                           f"it. {hint}.")
    reason = _unreachable(endpoint())
    if reason is not None:
        raise WeightsError(_unreachable_message(where, reason, hint))
    return _download(repo_id, filename, where, hint)


def _from_cache(repo_id, filename):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir(),
                                    local_files_only=True))
    except LocalEntryNotFoundError:
        return None


def _download(repo_id, filename, where, hint):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (HfHubHTTPError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled)
    try:
        return Path(hf_hub_download(repo_id, filename, cache_dir=cache_dir(),
                                    endpoint=endpoint()))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError) as exc:
        # huggingface_hub reports a failed request as "not in the cache" too; its cause says
        # whether the server answered (an HTTP status) or could not be reached.
        cause = exc if isinstance(exc, HfHubHTTPError) else exc.__cause__ or exc
        status = getattr(getattr(cause, "response", None), "status_code", None)
        if status is None:
            raise WeightsError(_unreachable_message(where, _first_line(cause), hint)) from None
        raise WeightsError(f"{where} could not be downloaded: {endpoint()} (HF_ENDPOINT) answered "
                           f"HTTP {status}; a mirror may not hold this repository, and a gated or "
                           f"private one needs `hf auth login`. {hint}.") from None
    except OSError as exc:
        raise WeightsError(f"{where} could not be downloaded from {endpoint()} into "
                           f"{cache_dir()}: {exc}. {hint}.") from None


def _first_line(exc):
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _unreachable_message(where, reason, hint):
    return (f"{where} is not in the hub cache {cache_dir()}, and {endpoint()} cannot be reached "
            f"({reason}). Set HF_ENDPOINT to a mirror you can reach, or, without network, "
            f"HF_HUB_OFFLINE=1 to use the cache only. {hint}.")


def _unreachable(url, timeout=PROBE_TIMEOUT):
    """Why a direct connection to the host of `url` fails, or None when it succeeds. Behind a
    proxy, which huggingface_hub goes through and a direct connection would not, None."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    parts = urllib.parse.urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as exc:
        return str(exc) or type(exc).__name__
    return None
