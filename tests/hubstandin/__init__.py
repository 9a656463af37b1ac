"""An HTTP stand-in of the Hugging Face Hub for tests (see `server.py`), and the `hub` fixture.

    from tests.hubstandin import HubStandIn, hub  # noqa: F401  (`hub` is a pytest fixture)

    def test_something(hub: HubStandIn) -> None:
        sha = hub.add_repo("org/model", {"config.json": b"{}"})
        ...  # call the real client with endpoint=hub.url

The fixture also isolates `huggingface_hub` for the test: endpoint, caches and token file under
`tmp_path`, no implicit token, online, no telemetry (whose user-agent probe would call the public
Hub). After the test it checks that the client used no endpoint the stand-in does not serve.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hubstandin.server import (
    CDN,
    HUB,
    Collection,
    Commit,
    HubStandIn,
    Incoming,
    RecordedRequest,
    Refused,
    Repo,
    RepoFile,
    Response,
    git_blob_sha,
    hub_error,
    json_response,
    route,
)

__all__ = ["CDN", "HUB", "Collection", "Commit", "HubStandIn", "Incoming", "RecordedRequest",
           "Refused", "Repo", "RepoFile", "Response", "git_blob_sha", "hub", "hub_error",
           "isolate_hf_environment", "json_response", "route"]

# Read by huggingface_hub at call time from the environment.
_UNSET_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
              "HF_OIDC_RESOURCE", "HF_HUB_DISABLE_IMPLICIT_TOKEN")


def isolate_hf_environment(monkeypatch: pytest.MonkeyPatch, home: Path, endpoint: str) -> None:
    """Point `huggingface_hub` at `endpoint` with all its files under `home`, for one test.

    `huggingface_hub.constants` copies the environment when first imported, so the constants are
    patched as well as the variables (for code that imports the library later, e.g. a subprocess).
    """
    home.mkdir(parents=True, exist_ok=True)
    paths = {"HF_HOME": home, "HF_HUB_CACHE": home / "hub", "HF_ASSETS_CACHE": home / "assets",
             "HF_XET_CACHE": home / "xet", "HF_TOKEN_PATH": home / "token"}
    for name in _UNSET_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, path in paths.items():
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"]))
    monkeypatch.setenv("NO_PROXY", no_proxy)

    from huggingface_hub import constants

    patched = {
        # Both or neither: `hf_hub_url` swaps the template's ENDPOINT prefix for `endpoint=`.
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_TELEMETRY": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False,
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(paths["HF_HUB_CACHE"]),
        "HUGGINGFACE_HUB_CACHE": str(paths["HF_HUB_CACHE"]),
        "HF_ASSETS_CACHE": str(paths["HF_ASSETS_CACHE"]),
        "HUGGINGFACE_ASSETS_CACHE": str(paths["HF_ASSETS_CACHE"]),
        "HF_XET_CACHE": str(paths["HF_XET_CACHE"]),
        "HF_TOKEN_PATH": str(paths["HF_TOKEN_PATH"]),
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
    }
    for name, value in patched.items():
        if hasattr(constants, name):  # names differ across huggingface_hub versions
            monkeypatch.setattr(constants, name, value)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubStandIn]:
    """A started `HubStandIn`, with `huggingface_hub` isolated and pointed at it."""
    with HubStandIn() as standin:
        isolate_hf_environment(monkeypatch, tmp_path / "hf-home", standin.url)
        yield standin
    unserved = [f"{r.method} {r.path}" for r in standin.unhandled]
    assert not unserved, f"the client used endpoints the Hub stand-in does not serve: {unserved}"
