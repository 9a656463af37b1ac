"""Hub destinations (`hub://org/name`): the finished output directory, pushed in one commit (or
one pull request with `create_pr`) to a repo that is created private unless the spec says
otherwise. The engine writes the output to a staging directory first, so a merge that fails
or is cancelled pushes nothing; a push that fails adds no commit (the upload is one commit).
A repo the push had to create stays, empty: deleting it again could race another job that
found it and is pushing to it, and the retry uses it.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_service.errors import HubPushError, Problem
from merge_service.sources.resolve import HubOptions, request_errors

HUB_SCHEME = "hub://"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def hub_repo_id(destination: str | None) -> str | None:
    """`hub://org/name` -> `org/name`; None for a local destination."""
    if destination is None or not destination.startswith(HUB_SCHEME):
        return None
    return destination[len(HUB_SCHEME):].rstrip("/")


def hub_destination_problems(destination: str, hub: HubOptions) -> list[Problem]:
    repo_id = hub_repo_id(destination) or ""
    problems = []
    if not _REPO_ID.match(repo_id) or ".." in repo_id or "--" in repo_id \
            or repo_id.endswith(".git"):
        problems.append(Problem(f"expected hub://ORG/NAME (a Hub repo id, no revision), got "
                                f"{destination!r}", field="output.destination"))
    if not hub.token:
        problems.append(Problem("pushing to the Hub needs a token with write access: configure "
                                "MERGE_SERVICE_HF_TOKEN", field="output.destination"))
    elif not problems:  # a refusal is asked again: the user may just have been given rights
        refusal = write_refusal(repo_id, whoami(hub)) and write_refusal(
            repo_id, whoami(hub, fresh=True))
        if refusal:
            problems.append(Problem(refusal, field="output.destination"))
    return problems


_WHOAMI_TTL = 300.0  # seconds: the Hub rate-limits whoami, and every submit checks
_whoami_cache: dict[tuple[str | None, str], tuple[float, dict[str, Any] | None]] = {}
_whoami_lock = threading.Lock()


def whoami(hub: HubOptions, fresh: bool = False) -> dict[str, Any] | None:
    """What the Hub says of the configured token (`/api/whoami-v2`), cached per endpoint and
    token for a few minutes unless `fresh`. `{}`: the Hub refused the token (401). None: no
    answer to judge by (unreachable, offline, another error), so the push will tell."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    key = (hub.endpoint, hub.token or "")
    with _whoami_lock:
        cached = _whoami_cache.get(key)
    if not fresh and cached is not None and time.monotonic() - cached[0] < _WHOAMI_TTL:
        return cached[1]
    unanswered: tuple[type[Exception], ...] = (OSError, ValueError, *request_errors())
    answer: dict[str, Any] | None
    try:
        answer = HfApi(endpoint=hub.endpoint, token=hub.token).whoami()
    except HfHubHTTPError as exc:
        if exc.response is None or exc.response.status_code != 401:
            return None
        answer = {}
    except unanswered:
        return None
    with _whoami_lock:
        _whoami_cache[key] = (time.monotonic(), answer)
    return answer


def write_refusal(repo_id: str, who: dict[str, Any] | None) -> str | None:
    """Why the token that `who` describes cannot push to `repo_id`, when the Hub's answer says
    so for certain: an invalid token, a read-only one, a namespace that is neither its user's
    nor one of its organisations' (an organisation where it may only read), or a fine-grained
    token with no `repo.write` on the namespace or the repo. None where it may, or where the
    answer cannot tell (then the push tells)."""
    if who is None:
        return None
    if not who:
        return "the Hub refuses the configured token (MERGE_SERVICE_HF_TOKEN): invalid credentials"
    token = (who.get("auth") or {}).get("accessToken") or {}
    user = who.get("name")
    namespace = repo_id.split("/")[0]
    role = token.get("role")
    if role == "read":
        return (f"the configured Hub token (user {user}) is read-only: pushing to {repo_id} "
                "needs one with write access")
    if role == "write":
        orgs = {org.get("name"): org.get("roleInOrg") for org in who.get("orgs") or []}
        if namespace == user or (namespace in orgs and orgs[namespace] != "read"):
            return None
        writable = [user, *sorted(name for name, r in orgs.items() if r != "read")]
        return (f"the configured Hub token (user {user}) cannot create or change repos under "
                f"{namespace!r}; it may write under: {', '.join(map(str, writable))}")
    if role == "fineGrained":
        for scope in (token.get("fineGrained") or {}).get("scoped") or []:
            entity = scope.get("entity") or {}
            if "repo.write" in (scope.get("permissions") or []) and (
                    (entity.get("type") in ("user", "org") and entity.get("name") == namespace)
                    or (entity.get("type") == "model" and entity.get("name") == repo_id)):
                return None
        return (f"the configured fine-grained Hub token (user {user}) grants no repo.write on "
                f"{namespace!r} or on {repo_id}")
    return None


@dataclass(frozen=True)
class HubPush:
    """Where a merge goes on the Hub, and the local directory it is staged in first."""

    repo_id: str
    private: bool
    create_pr: bool
    hub: HubOptions
    staging: Path  # a fresh directory, removed after the push (or the failure)

    @classmethod
    def plan(cls, destination: str, private: bool, create_pr: bool, hub: HubOptions
             ) -> HubPush:
        root = hub.staging_dir or Path(tempfile.gettempdir())
        staging = root / f"push-{uuid.uuid4().hex[:12]}"
        return cls(hub_repo_id(destination) or "", private, create_pr, hub, staging)

    @property
    def output_dir(self) -> Path:
        return self.staging / self.repo_id.split("/")[-1]

    def cleanup(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


@dataclass(frozen=True)
class HubCommit:
    repo_id: str
    url: str  # the commit, or the pull request with create_pr
    revision: str  # the commit sha
    pr_url: str | None = None


def push_to_hub(directory: Path, push: HubPush, message: str, description: str) -> HubCommit:
    """Create the repo if needed and upload `directory` as one commit (or pull request)."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=push.hub.endpoint, token=push.hub.token)
    try:
        api.create_repo(push.repo_id, private=push.private, exist_ok=True, repo_type="model")
        info = api.upload_folder(repo_id=push.repo_id, folder_path=directory,
                                 repo_type="model", commit_message=message,
                                 commit_description=description, create_pr=push.create_pr)
    except Exception as exc:  # any failure of the client: network, HTTP status, protocol
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HubPushError(f"cannot push to Hub repo {push.repo_id}: {reason}") from exc
    return HubCommit(push.repo_id, info.pr_url or info.commit_url, info.oid, info.pr_url)
