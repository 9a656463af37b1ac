"""Turn a spec's `source` string into a local directory with a pinned revision.

`org/name[@revision]` is a Hub repo: its revision is resolved to a commit sha and only the
files a merge needs are fetched. Anything that looks like a path is a local directory.

Preflight alone (the API checking a job it is about to queue) needs no weights: with
`weights=False` a Hub repo's safetensors files are read up to the end of their headers (HTTP
range requests) and stood in for by sparse files of the same size holding just the header
(`HubOptions.headers_dir`), beside its small files (configs, tokenizer, index) from the Hub
cache. Every check preflight makes (names, dtypes, shapes, offsets, a truncated file) sees
what it would see in the real files; the worker downloads the weights when it runs the job.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from merge_service.errors import Problem
from merge_service.sources.cache import prune_unused

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                   ".gguf", ".ot"}
METADATA_SUFFIXES = {".json", ".txt", ".model", ".jinja"}
_FIRST_READ = 1 << 16  # a safetensors header of a few hundred tensors fits in one request
_MAX_HEADER = 100 * 2**20  # safetensors' own limit
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
HEADER_KEEP_S = 7 * 86400  # header copies no preflight used for a week are removed
HEADER_PRUNE_EVERY_S = 3600.0
_pruned_at = -float("inf")


@dataclass(frozen=True)
class HubOptions:
    """How to reach the Hub. Tokens come from configuration only, never from a spec."""

    endpoint: str | None = None
    token: str | None = field(default=None, repr=False)  # never in a log line or traceback
    cache_dir: Path | None = None
    staging_dir: Path | None = None  # outputs for hub:// destinations are written here first
    headers_dir: Path | None = None  # header-only stand-ins of Hub weights, for preflight


@dataclass(frozen=True)
class ResolvedSource:
    source: str  # as written in the spec
    path: Path  # local directory holding the files
    repo_id: str | None = None  # Hub sources only
    revision: str | None = None  # Hub commit sha

    @property
    def pinned(self) -> str:
        """The source as written in `merge_spec.yaml`: Hub ids carry their commit sha."""
        return f"{self.repo_id}@{self.revision}" if self.repo_id else str(self.path)


def looks_local(source: str) -> bool:
    if source.startswith(("/", "./", "../", "~", ".\\")) or source in {".", ".."}:
        return True
    try:
        exists = Path(source).expanduser().exists()
    except (OSError, ValueError):  # too long to be a path, a NUL: no Hub id either
        return True
    return exists or not _HUB_ID.match(source)


def resolve_source(source: str, label: str, hub: HubOptions, *, weights: bool = True
                   ) -> tuple[ResolvedSource | None, list[Problem]]:
    """`weights=False` (with `hub.headers_dir` set): a Hub repo's safetensors files as their
    headers only, enough for preflight and no more."""
    if looks_local(source):
        try:
            path = Path(source).expanduser().resolve()
            if not path.is_dir():
                what = "is a file, expected a model or adapter directory" if path.exists() \
                    else "does not exist"
                return None, [Problem(f"local source {path} {what}", model=label)]
        except (OSError, RuntimeError, ValueError) as exc:  # too long, a link loop, `~nobody`, NUL
            return None, [Problem(f"cannot use the local source {source!r}: "
                                  f"{getattr(exc, 'strerror', None) or exc}", model=label)]
        return ResolvedSource(source, path), []
    repo_id, _, revision = source.partition("@")
    return _resolve_hub(source, repo_id, revision or None, label, hub,
                        headers_only=not weights and hub.headers_dir is not None)


def _resolve_hub(source: str, repo_id: str, revision: str | None, label: str,
                 hub: HubOptions, *, headers_only: bool
                 ) -> tuple[ResolvedSource | None, list[Problem]]:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    fetch_errors: tuple[type[Exception], ...] = (OSError, ValueError, KeyError,
                                                   *request_errors())
    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=headers_only)
        files = [s.rfilename for s in info.siblings or []]
        sha = info.sha
        if sha is None:  # the revision could not be pinned: a rerun might read other weights
            return None, [Problem(f"Hub repo {repo_id} gave no commit sha for revision "
                                  f"{revision or 'main'!r}", model=label)]
        needed = _needed_files(files)
        if "model.safetensors.index.json" in needed:
            index = hf_hub_download(repo_id, "model.safetensors.index.json", revision=sha,
                                    cache_dir=hub.cache_dir, token=hub.token,
                                    endpoint=hub.endpoint)
            shards = set(json.loads(Path(index).read_text())["weight_map"].values())
            needed |= shards
        if not needed & {"model.safetensors", "model.safetensors.index.json",
                         "adapter_model.safetensors"}:
            return None, [Problem(f"Hub repo {repo_id} has no safetensors weights "
                                  "(model.safetensors, its index, or adapter_model.safetensors)",
                                  model=label)]
        if headers_only:
            sizes = {s.rfilename: s.size for s in info.siblings or []}
            path = _header_copy(repo_id, sha, needed, sizes, hub)
        else:
            path = Path(snapshot_download(repo_id, revision=sha, allow_patterns=sorted(needed),
                                          cache_dir=hub.cache_dir, token=hub.token,
                                          endpoint=hub.endpoint))
    except GatedRepoError:  # before RepositoryNotFoundError: it is a subclass of it
        return None, [Problem(f"Hub repo {repo_id} is gated: configure a token with access",
                              model=label)]
    except RepositoryNotFoundError:
        return None, [Problem(f"Hub repo {repo_id} not found (or no access with the configured "
                              "token)", model=label)]
    except RevisionNotFoundError:
        return None, [Problem(f"revision {revision!r} not found in Hub repo {repo_id}",
                              model=label)]
    except OfflineModeIsEnabled:
        return None, [Problem(f"cannot fetch Hub repo {repo_id}: offline mode is enabled",
                              model=label)]
    except fetch_errors as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, [Problem(f"cannot fetch Hub repo {repo_id}: {reason}", model=label)]
    return ResolvedSource(source, path, repo_id=repo_id, revision=sha), []


def _header_copy(repo_id: str, sha: str, needed: set[str], sizes: dict[str, int | None],
                 hub: HubOptions) -> Path:
    """`headers_dir/REPO/SHA`: the small files of `needed` (links into the Hub cache) and each
    of its safetensors files as a sparse file of the real size holding only the header. Made
    once per commit (a commit never changes); each stub is written beside and renamed."""
    from huggingface_hub import snapshot_download

    assert hub.headers_dir is not None
    weights = {f for f in needed if f.endswith(".safetensors")}
    small = sorted(needed - weights)
    target = hub.headers_dir / repo_id / sha
    if target.is_dir():
        os.utime(target)  # in use: kept by `_prune_header_copies` for another while
    _prune_header_copies(hub.headers_dir)
    if small:
        cached = Path(snapshot_download(repo_id, revision=sha, allow_patterns=small,
                                        cache_dir=hub.cache_dir, token=hub.token,
                                        endpoint=hub.endpoint))
        for name in small:
            link = target / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.is_symlink():
                with contextlib.suppress(FileExistsError):  # a concurrent preflight made it
                    link.symlink_to(cached / name)
    for name in sorted(weights):
        stub, size = target / name, sizes.get(name)
        if stub.is_file() and size is not None and stub.stat().st_size == size:
            continue
        header = _fetch_header(repo_id, sha, name, hub)
        stub.parent.mkdir(parents=True, exist_ok=True)
        partial = stub.parent / f".{stub.name}.{uuid.uuid4().hex[:8]}"
        with partial.open("wb") as f:
            f.write(header)
            f.truncate(size if size is not None else len(header))  # a hole: no disk used
        os.replace(partial, stub)
    return target


def _prune_header_copies(headers_dir: Path) -> None:
    """At most once an hour per process: the header copies (`REPO/SHA`) no preflight used
    for a week, and the repo directories they leave empty."""
    global _pruned_at
    if time.monotonic() - _pruned_at < HEADER_PRUNE_EVERY_S or not headers_dir.is_dir():
        return
    _pruned_at = time.monotonic()
    copies = [path for pattern in ("*/*", "*/*/*") for path in headers_dir.glob(pattern)
              if _COMMIT_SHA.fullmatch(path.name)]  # `org/name/SHA`, or `name/SHA`
    for path in prune_unused(copies, HEADER_KEEP_S):
        with contextlib.suppress(OSError):  # not empty: other commits of the repo are kept
            for parent in path.parents:
                if parent == headers_dir:
                    break
                parent.rmdir()


def _fetch_header(repo_id: str, sha: str, filename: str, hub: HubOptions) -> bytes:
    """The first 8 + N bytes of a safetensors file on the Hub (N, its header length, is the
    first 8 bytes): one range request, a second one for a header longer than the first read.
    Fewer bytes come back only from a short or corrupt file, which preflight then reports."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, filename, revision=sha, endpoint=hub.endpoint)
    headers = build_hf_headers(token=hub.token)

    def read(start: int, end: int) -> bytes:
        with get_session().stream("GET", url, timeout=60,
                                  headers={**headers, "Range": f"bytes={start}-{end}"}
                                  ) as response:
            hf_raise_for_status(response)
            # a server that ignores Range sends the whole file from byte 0: read no further
            # than the range asked for, and let the rest go
            skip = start if response.status_code == 200 else 0
            wanted, chunks = skip + end - start + 1, bytearray()
            for chunk in response.iter_bytes():
                chunks += chunk
                if len(chunks) >= wanted:
                    break
            return bytes(chunks[skip:wanted])

    content = read(0, _FIRST_READ - 1)
    if len(content) < 8:
        return content
    (length,) = struct.unpack("<Q", content[:8])
    if length > _MAX_HEADER:
        return content[:8]
    if 8 + length > len(content) == _FIRST_READ:
        content += read(len(content), 8 + length - 1)
    return content[:8 + length]


def request_errors() -> tuple[type[Exception], ...]:
    """Requests that could not complete (connection refused, DNS, timeout) in the HTTP library
    of huggingface_hub: httpx2 (2.x) or httpx (1.x). They are not OSErrors, unlike those of
    requests (0.x)."""
    errors = []
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).RequestError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def _needed_files(files: list[str]) -> set[str]:
    """Adapter: config + weights. Model: safetensors weights, config and tokenizer files."""
    names = set(files)
    if "adapter_config.json" in names:
        return {"adapter_config.json"} | ({"adapter_model.safetensors"} & names)
    needed = {f for f in files if Path(f).suffix in METADATA_SUFFIXES
              and not f.endswith(".index.json")}
    if "model.safetensors.index.json" in names:
        needed.add("model.safetensors.index.json")
    elif "model.safetensors" in names:
        needed.add("model.safetensors")
    return needed
