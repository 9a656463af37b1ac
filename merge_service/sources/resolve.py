"""Turn a spec's `source` string into a local directory with a pinned revision.

`org/name[@revision]` is a Hub repo: its revision is resolved to a commit sha and only the
files a merge needs are fetched. Anything that looks like a path is a local directory.
"""

from __future__ import annotations

import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from merge_service.errors import Problem

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(@[\w./-]+)?$")
WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx",
                   ".gguf", ".ot"}
METADATA_SUFFIXES = {".json", ".txt", ".model", ".jinja"}


@dataclass(frozen=True)
class HubOptions:
    """How to reach the Hub. Tokens come from configuration only, never from a spec."""

    endpoint: str | None = None
    token: str | None = field(default=None, repr=False)  # never in a log line or traceback
    cache_dir: Path | None = None
    staging_dir: Path | None = None  # outputs for hub:// destinations are written here first


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
    return Path(source).expanduser().exists() or not _HUB_ID.match(source)


def resolve_source(source: str, label: str, hub: HubOptions) -> tuple[ResolvedSource | None,
                                                                        list[Problem]]:
    if looks_local(source):
        path = Path(source).expanduser().resolve()
        if not path.is_dir():
            what = "is a file, expected a model or adapter directory" if path.exists() \
                else "does not exist"
            return None, [Problem(f"local source {path} {what}", model=label)]
        return ResolvedSource(source, path), []
    repo_id, _, revision = source.partition("@")
    return _resolve_hub(source, repo_id, revision or None, label, hub)


def _resolve_hub(source: str, repo_id: str, revision: str | None, label: str,
                 hub: HubOptions) -> tuple[ResolvedSource | None, list[Problem]]:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi(endpoint=hub.endpoint, token=hub.token)
    try:
        info = api.model_info(repo_id, revision=revision)
        files = [s.rfilename for s in info.siblings or []]
        sha = info.sha
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
        path = snapshot_download(repo_id, revision=sha, allow_patterns=sorted(needed),
                                 cache_dir=hub.cache_dir, token=hub.token, endpoint=hub.endpoint)
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
    except (OSError, ValueError, KeyError, *_request_errors()) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, [Problem(f"cannot fetch Hub repo {repo_id}: {reason}", model=label)]
    return ResolvedSource(source, Path(path), repo_id=repo_id, revision=sha), []


def _request_errors() -> tuple[type[Exception], ...]:
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
