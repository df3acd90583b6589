"""Where a checkpoint comes from: a local folder, ModelScope or the Hugging Face Hub.

A model id is looked up in both hubs' caches first (no network). Offline (any of
``OFFLINE_VARIABLES`` set), a cached copy is used and nothing is downloaded. Online, a
hub that does not answer a short connection probe is skipped, so a machine without
network fails within seconds with one :class:`DownloadError`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from langchain_baichuan2.loading.checkpoint import CheckpointError, weight_files

logger = logging.getLogger(__name__)

Source = Literal["auto", "local", "modelscope", "huggingface"]

SOURCES: tuple[str, ...] = ("auto", "local", "modelscope", "huggingface")
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "MODELSCOPE_OFFLINE")
"""Any of these set to 1 means no network: model ids come from the hubs' caches only.

The installed ModelScope SDK reads no offline variable of its own; ``MODELSCOPE_OFFLINE``
is the name ModelScope users set, so it is honoured here for both hubs too.
"""
_HUB_NAMES = {"modelscope": "ModelScope", "huggingface": "the Hugging Face Hub"}
# Downloads never fetch the Python files that sit beside official checkpoints.
_SKIP_PATTERNS = ["*.py", "*.pyc"]
# What a hub model id may look like: one owner, one name, no path tricks.
_MODEL_ID = re.compile(r"[\w.-]+/[\w.-]+")
# Seconds a hub has to accept a connection before it counts as unreachable.
PROBE_TIMEOUT = 3.0


class DownloadError(RuntimeError):
    """A model id could not be fetched from any source (nor found in a cache)."""


def offline_variable() -> str | None:
    """The first of ``OFFLINE_VARIABLES`` that is set to a true value, if any."""
    for variable in OFFLINE_VARIABLES:
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return variable
    return None


def resolve_model_path(
    name: str | Path,
    *,
    revision: str | None = None,
    source: Source = "auto",
    usable: Callable[[Path], bool] | None = None,
) -> Path:
    """Return a local folder for ``name``: the folder itself, or a hub snapshot.

    ``usable`` says whether a cached snapshot is complete (default: a model's files).

    Raises:
        ValueError: ``source`` is not one of ``SOURCES``.
        CheckpointError: ``name`` is a missing folder, or not a model id.
        DownloadError: No source had the model id (the message says what to do).
    """
    if source not in SOURCES:
        msg = f"source must be one of {', '.join(SOURCES)}; got {source!r}"
        raise ValueError(msg)
    path = Path(name).expanduser()
    if source in ("auto", "local") and path.is_dir():
        return path
    if source == "local" or path.is_absolute() or str(name).startswith("."):
        msg = f"Model folder {str(path)!r} does not exist"
        raise CheckpointError(msg)
    if not _MODEL_ID.fullmatch(str(name)) or ".." in str(name):
        msg = (
            f"{str(name)!r} is neither an existing folder nor a model id of the form "
            "'owner/name' (such as 'baichuan-inc/Baichuan2-7B-Chat')"
        )
        raise CheckpointError(msg)
    return _download(str(name), revision, source, usable or _usable)


def _download(
    name: str, revision: str | None, source: Source, usable: Callable[[Path], bool]
) -> Path:
    """A cached snapshot of ``name``, else one downloaded from the first hub that answers."""
    hubs: list[str] = ["modelscope", "huggingface"] if source == "auto" else [str(source)]
    cached = {hub: _cached(hub, name, revision, usable) for hub in hubs}
    offline = offline_variable()
    if offline is not None:
        for folder in cached.values():
            if folder is not None:
                return folder
        tried = [f"{_HUB_NAMES[hub]}: not in its cache" for hub in hubs]
        raise DownloadError(_failure(name, revision, hubs, f"{offline} is set", tried))
    order = [hub for hub in hubs if cached[hub]] + [hub for hub in hubs if not cached[hub]]
    reachable = _reachable({hub: _endpoint(hub) for hub in order})
    failures = []
    for hub in order:
        folder = cached[hub]
        if not reachable[hub]:
            if folder is not None:
                logger.info("%s is unreachable: using its cached %s", _HUB_NAMES[hub], folder)
                return folder
            failures.append(f"{_HUB_NAMES[hub]}: {_endpoint(hub)} is unreachable")
            continue
        try:
            return _fetch(hub, name, revision)
        except Exception as e:  # each hub raises its own network and lookup errors
            if folder is not None:
                logger.warning("Could not update %s from %s (%s); using it", folder, hub, e)
                return folder
            failures.append(f"{_HUB_NAMES[hub]}: {type(e).__name__}: {e}")
    unreachable = not any(reachable.values())
    why = "no network" if unreachable else "not available"
    raise DownloadError(_failure(name, revision, hubs, why, failures))


def _failure(name: str, revision: str | None, hubs: list[str], why: str, details: list[str]) -> str:
    """The message of a ``DownloadError``: what was tried, then what to do, on line one."""
    where = " or ".join(_HUB_NAMES[hub] for hub in hubs)
    pinned = f" (revision {revision!r})" if revision else ""
    first = (
        f"Could not download {name!r}{pinned} from {where} ({why}). Pass a local "
        f"checkpoint folder instead (model='/path/to/{name.split('/')[-1]}'), or, with "
        f"the model already in a hub's cache, set {OFFLINE_VARIABLES[0]}=1 (or "
        f"{'=1 / '.join(OFFLINE_VARIABLES[1:])}=1) to load it with no network."
    )
    return "\n".join([first, *(f"  {line}" for line in details)])


def _usable(folder: Path) -> bool:
    """Whether a cached snapshot looks complete enough to check and load."""
    try:
        weight_files(folder)
    except CheckpointError:
        return False
    return (folder / "config.json").is_file() and (folder / "tokenizer.model").is_file()


def _cached(
    hub: str, name: str, revision: str | None, usable: Callable[[Path], bool] = _usable
) -> Path | None:
    """The hub's cached snapshot of ``name`` (never touching the network), if usable."""
    try:
        if hub == "modelscope":
            from modelscope import snapshot_download as ms_snapshot_download

            folder = ms_snapshot_download(
                name, revision=revision or "master", local_files_only=True
            )
        else:
            from huggingface_hub import snapshot_download as hf_snapshot_download

            folder = hf_snapshot_download(name, revision=revision, local_files_only=True)
    except Exception:  # each hub has its own "not in the cache" error
        return None
    return Path(folder) if usable(Path(folder)) else None


def _endpoint(hub: str) -> str:
    """The hub's base URL, as its SDK resolves it (``MODELSCOPE_ENDPOINT``, ``HF_ENDPOINT``)."""
    if hub == "modelscope":
        from modelscope.hub.api import HubApi

        return str(HubApi().endpoint)
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


def _reachable(endpoints: dict[str, str], timeout: float = PROBE_TIMEOUT) -> dict[str, bool]:
    """Whether each hub accepts a TCP connection within ``timeout`` seconds (in parallel).

    Name resolution has no timeout of its own, so each probe runs in a daemon thread
    that is abandoned when it takes too long.
    """
    result = dict.fromkeys(endpoints, False)

    def probe(hub: str, url: str) -> None:
        parts = urlsplit(url)
        port = parts.port or (80 if parts.scheme == "http" else 443)
        try:
            with socket.create_connection((parts.hostname or "", port), timeout=timeout):
                result[hub] = True
        except Exception:  # no network, DNS failure, refused, or sockets disabled
            result[hub] = False

    threads = [
        threading.Thread(target=probe, args=(hub, url), daemon=True, name=f"probe-{hub}")
        for hub, url in endpoints.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return dict(result)


def _fetch(hub: str, name: str, revision: str | None) -> Path:
    """Download ``name`` from one hub (files already in its cache are not fetched again)."""
    if hub == "huggingface":
        from huggingface_hub import snapshot_download as hf_snapshot_download

        return Path(hf_snapshot_download(name, revision=revision, ignore_patterns=_SKIP_PATTERNS))
    from modelscope import snapshot_download as ms_snapshot_download

    # The SDK makes ``models/<owner>--<name>/snapshots/<revision>`` before it asks the
    # server; a failed download must not leave those empty folders behind.
    root = Path(os.environ.get("MODELSCOPE_CACHE") or "~/.cache/modelscope").expanduser()
    made = [root, root / "models", root / "models" / name.replace("/", "--")]
    existed = {path for path in made if path.exists()}
    try:
        return Path(
            ms_snapshot_download(
                name, revision=revision or "master", ignore_file_pattern=_SKIP_PATTERNS
            )
        )
    except BaseException:
        for path in reversed(made):
            if (
                path not in existed
                and path.is_dir()
                and not any(p.is_file() for p in path.rglob("*"))
            ):
                shutil.rmtree(path, ignore_errors=True)
        raise
