"""A stand-in for the Hugging Face Hub, which the real `huggingface_hub` client talks to over HTTP.

Point the client at `HubStandIn.url` (`endpoint=` or `HF_ENDPOINT`). Repos live in memory as
git-like histories: each commit is a full snapshot `{path: bytes}` with a 40-hex sha; branches
and tags point at commits. Every request is recorded (method, path, headers) before it is
answered, so a test can assert what was fetched and which token was sent.

What it mirrors of the Hub, as read from huggingface_hub 2.x (`hf_api.py`, `file_download.py`,
`_snapshot_download.py`, `utils/_http.py`):

- `GET /api/models/{repo}[/revision/{rev}]`: model info (`id`, `sha`, `siblings`, ...).
- `GET /api/models/{repo}/tree/{rev}[/{path}]`: the listing `snapshot_download` filters.
- `GET /api/collections/{namespace}/{slug}`: a collection and its items (`get_collection`);
  build them with `add_collection` / `add_collection_item` / `remove_collection_item`.
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: regular (git) files are answered directly with
  `ETag` = git blob sha and `X-Repo-Commit`; LFS files (weights) answer `302` to a second server
  standing in for the CDN, with `X-Linked-Etag` (sha256), `X-Linked-Size` and `Location`, as the
  Hub does. The CDN is another origin, so the client must not send the token there.
- Failures carry the Hub's `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`,
  `GatedRepo`) or `X-Error-Message`, from which the client raises its own exception types.

No Xet header (`X-Xet-Hash`, `X-Xet-Refresh-Route`, ...) is ever sent and tree entries carry no
`xetHash`, so downloads take the plain HTTP path even where `hf_xet` is installed.

Writes (`create_repo`, `upload_folder`, `create_commit`), as `hf_api.py`, `_commit_api.py` and
`lfs.py` send them:

- `GET /api/whoami-v2`: the token's user, organisations and role (`read`, `write` or
  `fineGrained` with its scoped grants), as `add_token` and `grant_write` made them.
- `POST /api/repos/create`: the repo with the Hub's initial `.gitattributes` commit; 409 if it
  exists; 403 outside the namespaces the token may write to (its user's, and `grant_write`;
  none for a `read` token; a `fineGrained` one's user/org grants).
- `POST /api/validate-yaml`: the README's front matter must parse.
- `POST /api/models/{repo}/preupload/{rev}`: `regular` or `lfs` per file, and the oid already there.
- `POST /{repo}.git/info/lfs/objects/batch`, then `PUT` of each blob to the CDN and `POST
  .../verify`: the LFS "basic" transfer. Uploads need the legacy path: the client takes Xet
  whenever `hf_xet` is installed, so set `HF_HUB_DISABLE_XET=1` for it.
- `POST /api/models/{repo}/commit/{rev}[?create_pr=1]`: the NDJSON commit (`header`, `file`,
  `lfsFile`, `deletedFile`); with `create_pr`, on a new `refs/pr/N` branched from `rev`.

To add an endpoint: write a method
`(self, request: Incoming, **path_groups) -> Response`, decorate it with `route(...)`, and change
repos through `add_repo` / `add_commit` so that shas and history stay consistent.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import MappingProxyType, TracebackType
from typing import Any, Literal
from urllib.parse import parse_qs, quote, unquote, urlsplit

HUB = "hub"
CDN = "cdn"

# Patterns of the Hub's default `.gitattributes` (stored through LFS), plus anything large.
LFS_SUFFIXES = (".7z", ".arrow", ".bin", ".bz2", ".ckpt", ".ftz", ".gz", ".h5", ".joblib",
                ".mlmodel", ".model", ".msgpack", ".npy", ".npz", ".onnx", ".ot", ".parquet",
                ".pb", ".pickle", ".pkl", ".pt", ".pth", ".rar", ".safetensors", ".tar", ".tflite",
                ".tgz", ".wasm", ".xz", ".zip", ".zst")
LFS_MIN_SIZE = 10 * 2**20
# the `.gitattributes` of the Hub's initial commit (abridged: the patterns of LFS_SUFFIXES)
_GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n"
                         for suffix in LFS_SUFFIXES).encode()
_EPOCH = datetime(2024, 1, 1, tzinfo=UTC)
Gated = Literal[False, "auto", "manual"]
TokenRole = Literal["read", "write", "fineGrained"]


# --- what the Hub stores ---------------------------------------------------------------------

def git_blob_sha(content: bytes) -> str:
    """The object id git gives a file: sha1 of `blob <size>\\0<content>`."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class RepoFile:
    path: str
    content: bytes
    lfs: bool
    sha256: str
    oid: str  # git blob sha of what git stores: the content, or its LFS pointer

    @classmethod
    def make(cls, path: str, content: bytes) -> RepoFile:
        lfs = path.endswith(LFS_SUFFIXES) or len(content) >= LFS_MIN_SIZE
        sha256 = hashlib.sha256(content).hexdigest()
        pointer = _lfs_pointer(sha256, len(content))
        return cls(path, content, lfs, sha256, git_blob_sha(pointer if lfs else content))

    @property
    def size(self) -> int:
        return len(self.content)

    def listing(self) -> dict[str, Any]:
        """As in `/tree` and in model info with `blobs=true` (the keys differ, see callers)."""
        entry: dict[str, Any] = {"oid": self.oid, "size": self.size}
        if self.lfs:
            entry["lfs"] = {"oid": self.sha256, "size": self.size,
                            "pointerSize": len(_lfs_pointer(self.sha256, self.size))}
        return entry


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n"
            .encode())


@dataclass(frozen=True)
class Commit:
    sha: str
    files: Mapping[str, RepoFile]  # the whole tree at this commit
    message: str
    parent: str | None
    date: datetime


@dataclass
class Collection:
    """A Hub collection: an ordered list of `(item_type, item_id)`."""

    slug: str
    object_id: str
    namespace: str
    title: str
    private: bool = False
    readers: set[str] = field(default_factory=set)
    items: list[tuple[str, str]] = field(default_factory=list)
    updated: datetime = _EPOCH

    def touch(self) -> None:
        self.updated = datetime.now(UTC).replace(microsecond=0)


@dataclass
class Repo:
    repo_id: str
    private: bool = False
    gated: Gated = False
    readers: set[str] = field(default_factory=set)  # tokens with access when private or gated
    commits: dict[str, Commit] = field(default_factory=dict)  # oldest first
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    default_branch: str = "main"

    def resolve(self, revision: str) -> Commit | None:
        """A branch, a tag, a full sha, or an unambiguous sha prefix of 7+ hex digits."""
        sha = self.branches.get(revision) or self.tags.get(revision)
        if sha is None and re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [s for s in self.commits if s.startswith(revision)]
            sha = matches[0] if len(matches) == 1 else None
        return self.commits.get(sha) if sha else None


# --- what was asked ----------------------------------------------------------------------------

@dataclass(frozen=True)
class RecordedRequest:
    server: str  # HUB or CDN
    method: str
    path: str  # as sent, percent-encoded, without the query
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]  # names lower-cased
    status: int
    route: str | None  # the endpoint that answered; None: no endpoint matched
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None  # the repo file a resolve or CDN request is about
    response_headers: Mapping[str, str] = field(default_factory=dict)  # names lower-cased

    @property
    def token(self) -> str | None:
        return _bearer(self.headers)

    @property
    def sent_content(self) -> bool:
        """The body of a repo file went out with this response."""
        return self.method == "GET" and self.status in (200, 206) and self.filename is not None


@dataclass
class Incoming:
    """A request as the endpoints see it; they fill `repo_id`, `revision`, `filename`."""

    server: str
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None

    @property
    def token(self) -> str | None:
        return _bearer(self.headers)

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default

    def flag(self, name: str) -> bool:
        return (self.param(name) or "").lower() in {"1", "true"}


def _bearer(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    return auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def json_response(data: Any, status: int = 200, headers: Mapping[str, str] | None = None
                  ) -> Response:
    return Response(status, json.dumps(data).encode(),
                    {"Content-Type": "application/json; charset=utf-8", **(headers or {})})


def hub_error(status: int, code: str | None, message: str,
              headers: Mapping[str, str] | None = None) -> Response:
    """An error as the Hub sends it: `X-Error-Code` picks the client's exception type."""
    extra = {"X-Error-Message": message, **({"X-Error-Code": code} if code else {})}
    return json_response({"error": message}, status, {**extra, **(headers or {})})


class Refused(Exception):
    """Raised by an endpoint to answer with `response` (an error) at once."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response


# --- routing -----------------------------------------------------------------------------------

_REPO = r"(?P<repo_id>[\w.-]+(?:/[\w.-]+)?)"
_REV = r"(?P<revision>[^/]+)"
_Endpoint = Callable[..., Response]


def route(method: str, pattern: str, server: str = HUB) -> Callable[[_Endpoint], _Endpoint]:
    """Serve `method` requests whose path matches `pattern` with the decorated method."""
    def mark(endpoint: _Endpoint) -> _Endpoint:
        routes = getattr(endpoint, "_hub_routes", [])
        endpoint._hub_routes = [*routes, (server, method, re.compile(pattern))]  # type: ignore[attr-defined]
        return endpoint
    return mark


class HubStandIn:
    """An in-memory Hub on 127.0.0.1 (random free ports), served from background threads.

    `with HubStandIn() as hub:` starts it; `hub.url` is the endpoint to give the client.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._repos: dict[str, Repo] = {}
        self._tokens: dict[str, str] = {}  # token -> user name
        self._blobs: dict[str, bytes] = {}  # sha256 -> content, what the CDN serves
        self._requests: list[RecordedRequest] = []
        self._writable: dict[str, set[str]] = {}  # token -> namespaces beyond its user's
        self._roles: dict[str, TokenRole] = {}
        self._scoped: dict[str, list[tuple[str, str]]] = {}  # fineGrained: repo.write grants
        self._faults: dict[str, list[Response]] = {}  # endpoint name -> answers to give first
        self._servers: dict[str, ThreadingHTTPServer] = {}
        self._connections: set[socket.socket] = set()
        self._commit_count = 0
        self._collections: dict[str, Collection] = {}  # slug -> collection
        self.honour_range = True  # False: file bodies always whole (a mirror without ranges)
        self._routes = [(server, method, pattern, name, getattr(self, name))
                        for name in dir(type(self))
                        for server, method, pattern in getattr(getattr(type(self), name),
                                                               "_hub_routes", [])]

    # lifecycle

    def start(self) -> HubStandIn:
        for kind in (HUB, CDN):
            handler = type(f"_{kind.title()}Handler", (_Handler,), {"standin": self, "kind": kind})
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            self._servers[kind] = server
            # A short poll: `shutdown()` waits for the loop to notice, once per server.
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02},
                             name=f"hub-standin-{kind}", daemon=True).start()
        return self

    def close(self) -> None:
        for server in self._servers.values():
            server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # keep-alive connections would hold their threads
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for server in self._servers.values():
            server.server_close()
        self._servers.clear()

    def __enter__(self) -> HubStandIn:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The Hub endpoint: pass it as `endpoint=` or `HF_ENDPOINT`."""
        return self._server_url(HUB)

    @property
    def cdn_url(self) -> str:
        return self._server_url(CDN)

    def _server_url(self, kind: str) -> str:
        if kind not in self._servers:
            raise RuntimeError("the Hub stand-in is not started (use `with HubStandIn() as hub`)")
        host, port = self._servers[kind].server_address[:2]
        return f"http://{host}:{port}"

    # content

    def add_token(self, token: str, user: str = "standin-user", role: TokenRole = "write",
                  scoped: Iterable[tuple[str, str]] = ()) -> None:
        """Make `token` valid. A request with any other token gets 401, as on the Hub. `role`
        as the Hub's tokens have it: `read` writes nowhere; `fineGrained` writes only where
        `scoped` grants `repo.write`, as (entity type, name) pairs: `("user"|"org",
        namespace)` or `("model", repo_id)`."""
        with self._lock:
            self._tokens[token] = user
            self._roles[token] = role
            self._scoped[token] = list(scoped)

    def add_repo(self, repo_id: str, files: Mapping[str, bytes], branch: str = "main", *,
                 private: bool = False, gated: Gated = False, readers: Iterable[str] = (),
                 message: str = "initial commit") -> str:
        """Create a model repo whose first commit holds `files`; return the commit sha.

        `private`: invisible (RepoNotFound) without a token in `readers`. `gated`: info and
        listing are public, file downloads need a token in `readers` (GatedRepo otherwise).
        """
        with self._lock:
            if repo_id in self._repos:
                raise ValueError(f"repo {repo_id} already exists")
            self._repos[repo_id] = Repo(repo_id, private=private, gated=gated,
                                        readers=set(readers), default_branch=branch)
            return self.add_commit(repo_id, files, branch=branch, message=message)

    def add_commit(self, repo_id: str, files: Mapping[str, bytes] | None = None, *,
                   delete: Iterable[str] = (), branch: str = "main",
                   message: str = "update files") -> str:
        """Commit on `branch` (created if new, from nothing): add or replace `files`, remove
        `delete`; return the new sha."""
        with self._lock:
            repo = self.repo(repo_id)
            parent = repo.branches.get(branch)
            tree = dict(repo.commits[parent].files) if parent else {}
            for path in delete:
                if tree.pop(path, None) is None:
                    raise KeyError(f"{path} is not in {repo_id}@{branch}")
            for path, content in (files or {}).items():
                tree[path] = RepoFile.make(path, bytes(content))
                if tree[path].lfs:
                    self._blobs[tree[path].sha256] = tree[path].content
            self._commit_count += 1
            digest = hashlib.sha1(f"{repo_id}\0{parent}\0{message}\0{self._commit_count}"
                                  .encode())
            for path in sorted(tree):
                digest.update(f"\0{path}\0{tree[path].oid}".encode())
            commit = Commit(digest.hexdigest(), MappingProxyType(tree), message, parent,
                            _EPOCH + timedelta(minutes=self._commit_count))
            repo.commits[commit.sha] = commit
            repo.branches[branch] = commit.sha
            return commit.sha

    def create_branch(self, repo_id: str, branch: str, revision: str) -> str:
        return self._point(repo_id, revision, self.repo(repo_id).branches, branch)

    def create_tag(self, repo_id: str, tag: str, revision: str) -> str:
        return self._point(repo_id, revision, self.repo(repo_id).tags, tag)

    def _point(self, repo_id: str, revision: str, refs: dict[str, str], name: str) -> str:
        with self._lock:
            commit = self.repo(repo_id).resolve(revision)
            if commit is None:
                raise KeyError(f"no revision {revision!r} in {repo_id}")
            refs[name] = commit.sha
            return commit.sha

    def grant(self, repo_id: str, token: str) -> None:
        """Give `token` access to a private or gated repo."""
        with self._lock:
            self.repo(repo_id).readers.add(token)

    def grant_write(self, token: str, namespace: str) -> None:
        """Let `token` create and change repos under `namespace` (its user's is always allowed)."""
        with self._lock:
            self._writable.setdefault(token, set()).add(namespace)

    def add_collection(self, namespace: str, title: str, items: Iterable[str] = (), *,
                       private: bool = False, readers: Iterable[str] = ()) -> str:
        """A collection owned by `namespace` holding the model repos `items` (in that order);
        return its slug `namespace/<title as a slug>-<24 hex>`, as the Hub makes them.
        `private`: RepoNotFound-like 404 without a token in `readers`."""
        with self._lock:
            words = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "collection"
            object_id = hashlib.sha1(f"{namespace}\0{title}\0{len(self._collections)}"
                                     .encode()).hexdigest()[:24]
            slug = f"{namespace}/{words}-{object_id}"
            self._collections[slug] = Collection(slug, object_id, namespace, title, private,
                                                 set(readers))
            for item in items:
                self.add_collection_item(slug, item)
            return slug

    def add_collection_item(self, slug: str, item_id: str, item_type: str = "model") -> None:
        """Append an item (a model repo id, or any id with another `item_type`)."""
        with self._lock:
            collection = self._collections[slug]
            collection.items.append((item_type, item_id))
            collection.touch()

    def remove_collection_item(self, slug: str, item_id: str) -> None:
        with self._lock:
            collection = self._collections[slug]
            collection.items = [i for i in collection.items if i[1] != item_id]
            collection.touch()

    def fail_next(self, endpoint: str, response: Response, times: int = 1) -> None:
        """Answer the next `times` requests to `endpoint` (a method name such as
        `_commit_files`) with `response` instead."""
        with self._lock:
            self._faults.setdefault(endpoint, []).extend([response] * times)

    def repo(self, repo_id: str) -> Repo:
        with self._lock:
            return self._repos[repo_id]

    def snapshot(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        """Every file of `repo_id` at `revision`, with its content."""
        with self._lock:
            commit = self.repo(repo_id).resolve(revision)
            if commit is None:
                raise KeyError(f"no revision {revision!r} in {repo_id}")
            return {path: file.content for path, file in commit.files.items()}

    # observations

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request received so far, in arrival order, on both servers."""
        with self._lock:
            return list(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    @property
    def unhandled(self) -> list[RecordedRequest]:
        """Requests no endpoint matched: the client used an API the stand-in does not serve."""
        return [r for r in self.requests if r.route is None]

    def downloaded(self, repo_id: str | None = None) -> list[str]:
        """Repo files whose content was sent, in order (LFS files count at the CDN)."""
        return [r.filename for r in self.requests if r.sent_content and r.filename
                and (repo_id is None or r.repo_id == repo_id)]

    def requested_files(self, repo_id: str | None = None) -> set[str]:
        """Repo files named by any request (HEAD, GET, CDN), whatever the answer."""
        return {r.filename for r in self.requests if r.filename
                and (repo_id is None or r.repo_id == repo_id)}

    # dispatch

    def _dispatch(self, kind: str, method: str, raw_path: str, headers: dict[str, str],
                  body: bytes) -> Response:
        split = urlsplit(raw_path)
        request = Incoming(kind, method, split.path, parse_qs(split.query), headers, body)
        with self._lock:
            response, name = None, None
            for server, route_method, pattern, endpoint_name, endpoint in self._routes:
                match = pattern.fullmatch(split.path)
                if server == kind and route_method == method and match:
                    name = endpoint_name
                    groups = {k: unquote(v) for k, v in match.groupdict().items()
                              if v is not None}
                    try:
                        faults = self._faults.get(endpoint_name)
                        response = faults.pop(0) if faults else endpoint(request, **groups)
                    except Refused as refused:
                        response = refused.response
                    except Exception as exc:  # a stand-in bug: answer 500, the test will see it
                        response = hub_error(500, None, f"stand-in failure: {exc!r}")
                    break
            if response is None:
                response = hub_error(404, None, f"the Hub stand-in has no endpoint for "
                                                f"{method} {split.path}")
            self._requests.append(RecordedRequest(
                kind, method, split.path, MappingProxyType(request.query),
                MappingProxyType(headers), response.status, name,
                request.repo_id, request.revision, request.filename,
                MappingProxyType({k.lower(): v for k, v in response.headers.items()})))
        return response

    def _readable_repo(self, request: Incoming, repo_id: str, *, content: bool) -> Repo:
        """The Hub's access rules: unknown token 401; private repo without access: RepoNotFound
        (401 anonymous, 404 signed in); gated file without access: GatedRepo (401 / 403)."""
        request.repo_id = repo_id
        token = request.token
        if token is not None and token not in self._tokens:
            raise Refused(hub_error(401, None, "Invalid credentials in Authorization header"))
        repo = self._repos.get(repo_id)
        if repo is None or (repo.private and token not in repo.readers):
            raise Refused(hub_error(401 if token is None else 404, "RepoNotFound",
                                    "Repository not found"))
        if content and repo.gated and token not in repo.readers:
            if token is None:
                raise Refused(hub_error(401, "GatedRepo", f"Access to model {repo_id} is "
                                        "restricted. You must have access to it and be "
                                        "authenticated to access it. Please log in."))
            raise Refused(hub_error(403, "GatedRepo", f"Access to model {repo_id} is restricted "
                                    "and you are not in the authorized list. Visit "
                                    f"{self.url}/{repo_id} to ask for access."))
        return repo

    def _commit(self, request: Incoming, repo: Repo, revision: str) -> Commit:
        request.revision = revision
        commit = repo.resolve(revision)
        if commit is None:
            raise Refused(hub_error(404, "RevisionNotFound", f"Invalid rev id: {revision}"))
        return commit

    # endpoints: the Hub

    @route("GET", rf"/api/models/{_REPO}")
    @route("GET", rf"/api/models/{_REPO}/revision/{_REV}")
    def _model_info(self, request: Incoming, repo_id: str, revision: str | None = None
                    ) -> Response:
        repo = self._readable_repo(request, repo_id, content=False)
        commit = self._commit(request, repo, revision or repo.default_branch)
        blobs = request.flag("blobs")
        siblings = []
        for path, file in commit.files.items():
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                listing = file.listing()
                sibling |= {"size": listing["size"], "blobId": listing["oid"]}
                if file.lfs:
                    sibling["lfs"] = {"size": file.size, "sha256": file.sha256,
                                      "pointerSize": listing["lfs"]["pointerSize"]}
            siblings.append(sibling)
        first = next(iter(repo.commits.values()))
        info: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0],
            "sha": commit.sha, "lastModified": _iso(commit.date), "createdAt": _iso(first.date),
            "private": repo.private, "gated": repo.gated, "disabled": False,
            "downloads": 0, "likes": 0, "tags": [], "siblings": siblings,
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        config = _json_or_none(commit.files.get("config.json"))
        if isinstance(config, dict):
            info["config"] = {k: config[k] for k in ("architectures", "model_type") if k in config}
        expand = request.query.get("expand")
        if expand:  # only the asked properties, as the Hub does
            info = {k: v for k, v in info.items() if k in {"_id", "id", *expand}}
        return json_response(info)

    @route("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.+))?")
    def _tree(self, request: Incoming, repo_id: str, revision: str, path: str = ""
              ) -> Response:
        repo = self._readable_repo(request, repo_id, content=False)
        commit = self._commit(request, repo, revision)
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        recursive = request.flag("recursive")
        folders: set[str] = set()
        files = []
        for name, file in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix):].split("/")
            if recursive:
                folders.update(prefix + "/".join(parts[:i]) for i in range(1, len(parts)))
            elif len(parts) > 1:
                folders.add(prefix + parts[0])
            if recursive or len(parts) == 1:
                files.append({"type": "file", "path": name, **file.listing()})
        if prefix and not files and not folders:
            raise Refused(hub_error(404, "EntryNotFound", f"{path} does not exist on {revision}",
                                    {"X-Repo-Commit": commit.sha}))
        entries = [{"type": "directory", "path": folder,
                    "oid": hashlib.sha1(f"{commit.sha}\0{folder}".encode()).hexdigest()}
                   for folder in sorted(folders)]
        return json_response(entries + files)

    @route("HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)")
    @route("GET", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)")
    def _resolve(self, request: Incoming, repo_id: str, revision: str, path: str) -> Response:
        request.filename = path
        repo = self._readable_repo(request, repo_id, content=True)
        commit = self._commit(request, repo, revision)
        file = commit.files.get(path)
        if file is None:
            return hub_error(404, "EntryNotFound", "Entry not found",
                             {"X-Repo-Commit": commit.sha})
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{file.oid}"', "Accept-Ranges": "bytes"}
        if file.lfs:
            location = (f"{self.cdn_url}/{file.sha256}?repo_id={quote(repo_id, safe='')}"
                        f"&filename={quote(path, safe='')}")
            body = f"Found. Redirecting to {location}".encode()
            return Response(302, body, {**headers, "Location": location,
                                        "X-Linked-Etag": f'"{file.sha256}"',
                                        "X-Linked-Size": str(file.size),
                                        "Content-Type": "text/plain; charset=utf-8"})
        return _content(request, file.content, headers, self.honour_range)

    def _writable_repo(self, request: Incoming, repo_id: str) -> Repo:
        """A repo the token may write to: 401 without a (known) token, RepoNotFound if it cannot
        even see the repo, 403 if it can see it but not write."""
        request.repo_id = repo_id
        self._writer(request)
        repo = self._repos.get(repo_id)
        token = request.token
        allowed = self._may_write(token, repo_id)
        if repo is None or (repo.private and token not in repo.readers and not allowed):
            raise Refused(hub_error(404, "RepoNotFound", "Repository not found"))
        if not allowed:
            raise Refused(hub_error(403, None, f"You don't have the rights to write to "
                                    f"{repo_id}"))
        return repo

    def _writer(self, request: Incoming) -> str:
        token = request.token
        if token is None:
            raise Refused(hub_error(401, None, "You must be authenticated to write"))
        if token not in self._tokens:
            raise Refused(hub_error(401, None, "Invalid credentials in Authorization header"))
        return token

    def _may_write(self, token: str | None, repo_id: str, creating: bool = False) -> bool:
        """A repo-scoped fine-grained grant changes the repo, but cannot create it."""
        if token is None or token not in self._tokens:
            return False
        namespace = repo_id.split("/")[0]
        role = self._roles[token]
        if role == "fineGrained":
            grants = [("user", namespace), ("org", namespace)]
            return any(g in self._scoped[token] for g in
                       (grants if creating else [*grants, ("model", repo_id)]))
        return role == "write" and (namespace == self._tokens[token]
                                    or namespace in self._writable.get(token, set()))

    @route("GET", r"/api/whoami-v2")
    def _whoami(self, request: Incoming) -> Response:
        """`HfApi.whoami`: the token's user, its organisations (the namespaces `grant_write`
        gave it) and the token's role, shaped as the Hub answers."""
        token = self._writer(request)
        user = self._tokens[token]
        access: dict[str, Any] = {"displayName": "stand-in", "role": self._roles[token],
                                  "createdAt": "2026-01-01T00:00:00.000Z"}
        if self._roles[token] == "fineGrained":
            access["fineGrained"] = {"canReadGatedRepos": False, "global": [], "scoped": [
                {"entity": {"_id": hashlib.sha1(name.encode()).hexdigest()[:24],
                            "type": kind, "name": name},
                 "permissions": ["repo.content.read", "repo.write"]}
                for kind, name in self._scoped[token]]}
        return json_response({
            "type": "user", "id": hashlib.sha1(user.encode()).hexdigest()[:24], "name": user,
            "fullname": user, "isPro": False, "canPay": False,
            "orgs": [{"type": "org", "name": name, "fullname": name, "roleInOrg": "write"}
                     for name in sorted(self._writable.get(token, set()))],
            "auth": {"type": "access_token", "accessToken": access}})

    @route("GET", r"/api/collections/(?P<slug>[\w.-]+/[\w.-]+-[0-9a-f]{24})")
    def _collection(self, request: Incoming, slug: str) -> Response:
        """`HfApi.get_collection`: the collection with its items, as the Hub lists them."""
        token = request.token
        if token is not None and token not in self._tokens:
            raise Refused(hub_error(401, None, "Invalid credentials in Authorization header"))
        collection = self._collections.get(slug)
        if collection is None or (collection.private and token not in collection.readers):
            return hub_error(404, None, "Collection not found")
        items = []
        for position, (item_type, item_id) in enumerate(collection.items):
            item: dict[str, Any] = {
                "_id": hashlib.sha1(f"{slug}\0{item_id}".encode()).hexdigest()[:24],
                "id": item_id, "type": item_type, "position": position}
            repo = self._repos.get(item_id) if item_type == "model" else None
            if repo is not None:
                head = repo.commits[repo.branches[repo.default_branch]]
                item |= {"author": item_id.split("/")[0], "repoType": "model",
                         "private": repo.private, "gated": repo.gated, "downloads": 0,
                         "likes": 0, "isLikedByUser": False,
                         "lastModified": _iso(head.date)}
            items.append(item)
        owner = collection.namespace
        return json_response({
            "slug": slug, "id": collection.object_id, "title": collection.title,
            "description": None, "owner": {"_id": hashlib.sha1(owner.encode()).hexdigest()[:24],
                                           "name": owner, "fullname": owner, "type": "user"},
            "items": items, "lastUpdated": _iso(collection.updated), "position": 0,
            "private": collection.private, "theme": "indigo", "upvotes": 0,
            "isUpvotedByUser": False, "shareUrl": f"{self.url}/collections/{slug}"})

    # endpoints: writes

    @route("POST", r"/api/repos/create")
    def _create_repo(self, request: Incoming) -> Response:
        token = self._writer(request)
        body = json.loads(request.body or b"{}")
        if body.get("type") not in (None, "model"):
            return hub_error(400, None, "The stand-in has model repos only")
        namespace = body.get("organization") or self._tokens[token]
        repo_id = f"{namespace}/{body['name']}"
        request.repo_id = repo_id
        if not self._may_write(token, repo_id, creating=True):
            return hub_error(403, None, f"You don't have the rights to create a model under the "
                                        f'namespace "{namespace}"')
        if repo_id in self._repos:  # the Hub's 409 carries the url (`exist_ok` reads it)
            message = "You already created this model repo"
            return json_response({"error": message, "url": f"{self.url}/{repo_id}"}, 409,
                                 {"X-Error-Message": message})
        private = body.get("visibility", "private" if body.get("private") else "public") \
            == "private"
        self.add_repo(repo_id, {".gitattributes": _GITATTRIBUTES}, private=private,
                      readers=[token], message="initial commit")
        return json_response({"url": f"{self.url}/{repo_id}", "name": repo_id,
                              "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    @route("POST", r"/api/validate-yaml")
    def _validate_yaml(self, request: Incoming) -> Response:
        import yaml

        content = json.loads(request.body or b"{}").get("content", "")
        match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        try:
            if match and not isinstance(yaml.safe_load(match[1]) or {}, dict):
                raise ValueError("the metadata must be a mapping")
        except (yaml.YAMLError, ValueError) as exc:
            return json_response({"errors": [{"message": str(exc)}], "warnings": []}, 400)
        return json_response({"errors": [], "warnings": []})

    @route("POST", rf"/api/models/{_REPO}/preupload/{_REV}")
    def _preupload(self, request: Incoming, repo_id: str, revision: str) -> Response:
        repo = self._writable_repo(request, repo_id)
        commit = self._commit(request, repo, revision)
        files = []
        for entry in json.loads(request.body)["files"]:
            lfs = entry["path"].endswith(LFS_SUFFIXES) or entry["size"] >= LFS_MIN_SIZE
            there = commit.files.get(entry["path"])
            oid = None if there is None else (there.sha256 if there.lfs else there.oid)
            files.append({"path": entry["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False, "oid": oid})
        return json_response({"files": files, "commitOid": commit.sha})

    @route("POST", rf"/{_REPO}\.git/info/lfs/objects/batch")
    def _lfs_batch(self, request: Incoming, repo_id: str) -> Response:
        self._writable_repo(request, repo_id)
        body = json.loads(request.body)
        if body.get("operation") != "upload" or "basic" not in body.get("transfers", ["basic"]):
            return hub_error(400, None, "The stand-in serves basic LFS uploads only")
        objects = []
        for obj in body["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            stored = self._blobs.get(obj["oid"])
            if stored is None or len(stored) != obj["size"]:  # else: already there, no action
                entry["authenticated"] = True
                entry["actions"] = {
                    "upload": {"href": f"{self.cdn_url}/upload/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify",
                               "header": {}},
                }
            objects.append(entry)
        return json_response({"transfer": "basic", "objects": objects},
                             headers={"Content-Type": "application/vnd.git-lfs+json"})

    @route("POST", rf"/{_REPO}\.git/info/lfs/objects/verify")
    def _lfs_verify(self, request: Incoming, repo_id: str) -> Response:
        self._writable_repo(request, repo_id)
        body = json.loads(request.body)
        stored = self._blobs.get(body["oid"])
        if stored is None or len(stored) != body["size"]:
            return hub_error(404, None, f"LFS object {body['oid']} was not uploaded")
        return json_response({"success": True})

    @route("POST", rf"/api/models/{_REPO}/commit/{_REV}")
    def _commit_files(self, request: Incoming, repo_id: str, revision: str) -> Response:
        repo = self._writable_repo(request, repo_id)
        base = self._commit(request, repo, revision)
        lines = [json.loads(line) for line in request.body.splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line["key"] == "header"), None)
        if header is None or not header.get("summary"):
            return hub_error(400, None, "A commit needs a header with a summary")
        if header.get("parentCommit") not in (None, base.sha):
            return hub_error(412, None, "A commit has happened since. Please refresh and try "
                                        "again.")
        files: dict[str, bytes] = {}
        deleted = []
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                content = self._blobs.get(value["oid"])
                if content is None:
                    return hub_error(422, None, f"LFS file {value['path']} ({value['oid']}) was "
                                                "not uploaded")
                files[value["path"]] = content
            elif key in ("deletedFile", "deletedFolder"):
                prefix = value["path"].rstrip("/")
                deleted += [p for p in base.files
                            if p == prefix or (key == "deletedFolder" and p.startswith(prefix))]
        message = header["summary"] + (f"\n\n{header['description']}"
                                       if header.get("description") else "")
        pr_url = None
        if request.flag("create_pr"):
            number = 1 + sum(name.startswith("refs/pr/") for name in repo.branches)
            branch = f"refs/pr/{number}"
            self.create_branch(repo_id, branch, base.sha)
            pr_url = f"{self.url}/{repo_id}/discussions/{number}"
        elif revision in repo.branches:
            branch = revision
        else:
            return hub_error(400, None, f"Can only commit to a branch, not {revision!r}")
        sha = self.add_commit(repo_id, files, delete=deleted, branch=branch, message=message)
        return json_response({"success": True, "commitOid": sha,
                              "commitUrl": f"{self.url}/{repo_id}/commit/{sha}",
                              "pullRequestUrl": pr_url, "hookOutput": ""})

    # endpoints: the CDN (signed URLs: no token needed, none expected)

    @route("PUT", r"/upload/(?P<sha256>[0-9a-f]{64})", server=CDN)
    def _cdn_upload(self, request: Incoming, sha256: str) -> Response:
        if hashlib.sha256(request.body).hexdigest() != sha256:
            return Response(400, b"BadDigest", {"Content-Type": "text/plain"})
        self._blobs[sha256] = request.body
        return Response(200, b"", {"ETag": f'"{sha256}"'})


    @route("HEAD", r"/(?P<sha256>[0-9a-f]{64})", server=CDN)
    @route("GET", r"/(?P<sha256>[0-9a-f]{64})", server=CDN)
    def _cdn_blob(self, request: Incoming, sha256: str) -> Response:
        request.repo_id = request.param("repo_id")
        request.filename = request.param("filename")
        content = self._blobs.get(sha256)
        if content is None:
            return Response(404, b"NoSuchKey", {"Content-Type": "text/plain"})
        return _content(request, content, {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"},
                        self.honour_range)


def _content(request: Incoming, content: bytes, headers: dict[str, str],
             ranges: bool = True) -> Response:
    """A file body, honouring `Range: bytes=a-[b]` (the client resumes downloads with it)
    unless `ranges` is off."""
    headers = {"Content-Type": "application/octet-stream", **headers}
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", request.headers.get("range", ""))
    if not match or not ranges:
        return Response(200, content, headers)
    start = int(match[1])
    end = min(int(match[2]) if match[2] else len(content) - 1, len(content) - 1)
    if start >= len(content):
        return Response(416, b"", {**headers, "Content-Range": f"bytes */{len(content)}"})
    return Response(206, content[start:end + 1],
                    {**headers, "Content-Range": f"bytes {start}-{end}/{len(content)}"})


def _json_or_none(file: RepoFile | None) -> Any:
    try:
        return json.loads(file.content) if file else None
    except ValueError:
        return None


def _iso(date: datetime) -> str:
    return date.strftime("%Y-%m-%dT%H:%M:%S.000Z")


class _Handler(BaseHTTPRequestHandler):
    """Plumbing: read the request, let the stand-in answer, write the answer."""

    protocol_version = "HTTP/1.1"
    standin: HubStandIn
    kind: str

    def setup(self) -> None:
        super().setup()
        with self.standin._lock:
            self.standin._connections.add(self.connection)

    def finish(self) -> None:
        with self.standin._lock:
            self.standin._connections.discard(self.connection)
        super().finish()

    def _serve(self) -> None:
        headers = {k.lower(): v for k, v in self.headers.items()}
        response = self.standin._dispatch(self.kind, self.command, self.path, headers,
                                          self._read_body(headers))
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def _read_body(self, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while (size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(headers.get("content-length") or 0))

    def log_message(self, format: str, *args: Any) -> None:  # the record is `standin.requests`
        pass
