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
import uuid
from dataclasses import dataclass
from pathlib import Path

from merge_service.errors import HubPushError, Problem
from merge_service.sources.resolve import HubOptions

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
    return problems


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
