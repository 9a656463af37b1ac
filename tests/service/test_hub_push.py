"""Hub in and out against the HTTP stand-in of the Hub (`tests/hubstandin`), which the real
`huggingface_hub` client talks to: `hub://` destinations pushed in one commit (or a pull
request) by the library, and through the service a Hub source pulled, a push refused, the job
failed with a clear error, then retried successfully.

The stand-in speaks the LFS upload protocol; the client takes Xet whenever `hf_xet` is
installed, so these tests set `HF_HUB_DISABLE_XET=1`.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from merge_service.engine import prepare, run_merge
from merge_service.errors import HubPushError, PreflightError
from merge_service.sinks.hub import whoami, write_refusal
from merge_service.sources.resolve import HubOptions
from merge_service.spec import spec_from_dict
from tests.hubstandin import HubStandIn, hub_error, isolate_hf_environment
from tests.hubstandin.server import TokenRole
from tests.service.conftest import (
    Inputs,
    Process,
    redis_url,
    service_env,
    service_settings,
    spec_body,
    start_worker,
    wait_for,
)
from workers.jobs import TERMINAL, JobRecord, JobStore
from workers.redis_server import EmbeddedRedis

pytestmark = pytest.mark.slow
TOKEN = f"hf_writer_{secrets.token_hex(8)}"
USER = "merger"


@pytest.fixture(scope="module")
def standin() -> Iterator[HubStandIn]:
    with HubStandIn() as hub:
        hub.add_token(TOKEN, USER)
        yield hub
    assert not hub.unhandled, [f"{r.method} {r.path}" for r in hub.unhandled]


@pytest.fixture
def hub_env(standin: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> HubOptions:
    isolate_hf_environment(monkeypatch, tmp_path / "hf-home", standin.url)
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return HubOptions(endpoint=standin.url, token=TOKEN, cache_dir=tmp_path / "cache",
                      staging_dir=tmp_path / "staging")


def pushed_files(hub: HubStandIn, repo_id: str, revision: str = "main") -> dict[str, bytes]:
    return {k: v for k, v in hub.snapshot(repo_id, revision).items() if k != ".gitattributes"}


def same_output(pushed: dict[str, bytes], local: Path) -> None:
    files = {str(p.relative_to(local)): p.read_bytes() for p in local.rglob("*") if p.is_file()}
    assert pushed.keys() == files.keys()
    for name, content in files.items():
        if name == "merge_report.json":
            ours, theirs = json.loads(pushed[name]), json.loads(content)
            for volatile in ("timings_s", "peak_memory"):
                ours.pop(volatile), theirs.pop(volatile)
            assert ours == theirs
        elif name == "merge_spec.yaml":
            assert yaml.safe_load(pushed[name])["models"] == yaml.safe_load(content)["models"]
        else:
            assert pushed[name] == content, name


# --- the library: hub:// destinations ----------------------------------------------------------

def test_push_creates_a_private_repo_with_one_commit(
        standin: HubStandIn, hub_env: HubOptions, minilm_inputs: Inputs, tmp_path: Path) -> None:
    repo_id = f"{USER}/merged-{secrets.token_hex(3)}"
    stages = []
    spec = spec_from_dict(spec_body(minilm_inputs, f"hub://{repo_id}"))
    result = run_merge(spec, hub=hub_env, progress=lambda p: stages.append(p.stage))

    repo = standin.repo(repo_id)
    assert repo.private
    assert len(repo.commits) == 2  # the Hub's initial commit, then the merge in one commit
    head = repo.resolve("main")
    assert head is not None
    assert result.revision == head.sha
    assert result.url == f"{standin.url}/{repo_id}/commit/{head.sha}"
    assert head.message.startswith("merge-service: task_arithmetic merge of 2 models")
    assert f"ft_a: {minilm_inputs.models[0]}" in head.message
    assert "pushing" in stages and stages[-1] == "pushing"
    pushed = pushed_files(standin, repo_id)
    # the local MiniLM's config.json names its parent model as _name_or_path, which its card
    # title contradicts: the card names no base_model rather than the wrong one
    front = yaml.safe_load(pushed["README.md"].decode().split("---\n")[1])
    assert "base_model" not in front
    assert b"base_model_relation: merge" in pushed["README.md"]
    reference = run_merge(spec_from_dict(spec_body(minilm_inputs, tmp_path / "local")))
    same_output(pushed, reference.destination)
    assert sorted(result.files) == sorted(pushed)
    # every write carried our token; the CDN (another origin) never saw it
    writes = [r for r in standin.requests if r.method in ("POST", "PUT")]
    assert all(r.token == TOKEN for r in writes if r.server == "hub")
    assert all(r.token is None for r in standin.requests if r.server == "cdn")
    assert not (tmp_path / "staging").exists() or not any((tmp_path / "staging").iterdir())

    # the same merge again: the weights are the same bytes, only the report's timings change
    again = run_merge(spec, hub=hub_env)
    assert len(repo.commits) == 3 and again.revision != head.sha
    second = pushed_files(standin, repo_id)
    assert {k for k in second if second[k] != pushed[k]} == {"merge_report.json"}


def test_push_as_a_pull_request(standin: HubStandIn, hub_env: HubOptions,
                                minilm_inputs: Inputs) -> None:
    repo_id = f"{USER}/pr-target-{secrets.token_hex(3)}"
    standin.add_repo(repo_id, {"README.md": b"# existing\n"}, private=True, readers=[TOKEN])
    before = standin.repo(repo_id).resolve("main")
    body = spec_body(minilm_inputs, f"hub://{repo_id}")
    body["output"]["create_pr"] = True
    result = run_merge(spec_from_dict(body), hub=hub_env)
    assert result.url == f"{standin.url}/{repo_id}/discussions/1"
    assert standin.repo(repo_id).resolve("main") == before  # main untouched
    pr = pushed_files(standin, repo_id, "refs/pr/1")
    assert result.revision == standin.repo(repo_id).branches["refs/pr/1"]
    assert "merge_report.json" in pr and pr["README.md"] != b"# existing\n"


def test_hub_destination_problems_are_found_before_any_work(
        hub_env: HubOptions, minilm_inputs: Inputs) -> None:
    body = spec_body(minilm_inputs, "hub://not a repo/x@main")
    with pytest.raises(PreflightError) as raised:
        run_merge(spec_from_dict(body), hub=HubOptions(endpoint=hub_env.endpoint))
    messages = [p.message for p in raised.value.problems]
    assert any("expected hub://ORG/NAME" in m for m in messages)
    assert any("MERGE_SERVICE_HF_TOKEN" in m for m in messages)


def test_a_refused_push_leaves_nothing(standin: HubStandIn, hub_env: HubOptions,
                                       minilm_inputs: Inputs, tmp_path: Path) -> None:
    """The token's rights are checked before the merge, but can be taken away while it runs:
    the Hub then refuses the commit, and the merge fails with its word, leaving nothing."""
    repo_id = f"{USER}/revoked-{secrets.token_hex(3)}"
    standin.fail_next("_commit_files", hub_error(
        403, None, f"You don't have the rights to write to {repo_id}"))
    with pytest.raises(HubPushError) as raised:
        run_merge(spec_from_dict(spec_body(minilm_inputs, f"hub://{repo_id}")), hub=hub_env)
    assert repo_id in str(raised.value) and "rights" in str(raised.value)
    assert TOKEN not in str(raised.value)
    assert list(standin.snapshot(repo_id)) == [".gitattributes"]  # created, nothing committed
    assert not any((tmp_path / "staging").iterdir())


@pytest.mark.parametrize("role, scoped, grant, refusal", [
    ("write", [], None, "(user merger) cannot create or change repos under 'someone-else'; "
                        "it may write under: merger"),
    ("write", [], "someone-else", None),
    ("read", [], None, "is read-only"),
    ("fineGrained", [("user", USER)], None, "grants no repo.write on 'someone-else'"),
    ("fineGrained", [("org", "someone-else")], None, None),
    ("fineGrained", [("model", "someone-else/merged")], None, None),
])
def test_the_token_may_write_to_the_destination_before_any_work(
        standin: HubStandIn, hub_env: HubOptions, minilm_inputs: Inputs, role: TokenRole,
        scoped: list[tuple[str, str]], grant: str | None, refusal: str | None) -> None:
    """What the Hub's whoami says of the token decides before the merge whether it could push:
    a read-only token, a namespace of someone else, a fine-grained token without repo.write
    there. Where it may, preflight passes and nothing was pushed yet."""
    token = f"hf_{role}_{secrets.token_hex(8)}"
    standin.add_token(token, USER, role, scoped)
    if grant:
        standin.grant_write(token, grant)
    spec = spec_from_dict(spec_body(minilm_inputs, "hub://someone-else/merged"))
    hub = dataclasses.replace(hub_env, token=token)
    if refusal is None:
        prepare(spec, hub=hub, weights=False).close()
    else:
        with pytest.raises(PreflightError) as raised:
            prepare(spec, hub=hub, weights=False).close()
        [problem] = raised.value.problems
        assert problem.field == "output.destination" and refusal in problem.message
        assert token not in str(raised.value)
    assert "someone-else/merged" not in standin._repos


def test_an_invalid_token_or_an_unreachable_hub(hub_env: HubOptions,
                                                minilm_inputs: Inputs) -> None:
    """A token the Hub refuses (401) is a preflight problem; a Hub that cannot be asked is not
    one (the push will tell, and a Hub outage is no fault of the spec)."""
    spec = spec_from_dict(spec_body(minilm_inputs, "hub://merger/merged"))
    with pytest.raises(PreflightError) as raised:
        prepare(spec, hub=dataclasses.replace(hub_env, token="hf_revoked"), weights=False)
    assert [p.message for p in raised.value.problems] == [
        "the Hub refuses the configured token (MERGE_SERVICE_HF_TOKEN): invalid credentials"]
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        nowhere = f"http://127.0.0.1:{closed.getsockname()[1]}"
    assert write_refusal("merger/merged", whoami(HubOptions(endpoint=nowhere,
                                                            token=TOKEN))) is None


# --- through the service ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hub_worker(standin: HubStandIn, redis_server: EmbeddedRedis,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Process]]:
    url = redis_url(redis_server, 4)
    store = JobStore.from_url(url)
    store.r.flushdb()
    root = tmp_path_factory.mktemp("hub-service")
    env = service_env(url, root / "data", MERGE_SERVICE_HF_ENDPOINT=standin.url,
                      MERGE_SERVICE_HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_HUB_DISABLE_XET="1",
                      HF_HOME=str(root / "hf-home"), HF_ENDPOINT=standin.url)
    worker = start_worker(env, store, root, f"hub-{secrets.token_hex(3)}@test")
    yield url, worker
    worker.stop()


def test_service_pulls_from_and_pushes_to_the_hub_and_retries_a_failed_push(
        standin: HubStandIn, hub_env: HubOptions, hub_worker: tuple[str, Process],
        minilm_inputs: Inputs, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from api.app import create_app

    url, worker = hub_worker
    source_repo = f"{USER}/minilm-ft-{secrets.token_hex(3)}"
    ft = minilm_inputs.models[1]
    sha = standin.add_repo(source_repo, {p.name: p.read_bytes() for p in ft.iterdir()
                                         if p.is_file()}, private=True, readers=[TOKEN])
    org = f"team-{secrets.token_hex(3)}"
    standin.grant_write(TOKEN, org)
    # the upload fails: the Hub answers the commit with a server error, as in an outage
    standin.fail_next("_commit_files", hub_error(500, None, "Internal Error"))
    body = spec_body(minilm_inputs, f"hub://{org}/merged")
    body["models"][1]["source"] = f"{source_repo}@main"

    settings = service_settings(url, tmp_path / "api-data", hf_endpoint=standin.url,
                                hf_token=TOKEN)
    store = JobStore.from_url(url)
    with TestClient(create_app(settings), base_url="http://127.0.0.1") as http:
        created = http.post("/v1/jobs", json=body)
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["spec"]["models"][1]["source"] == f"{source_repo}@{sha}"  # pinned
        record = _wait(store, job["id"])
        assert record.status == "failed"
        assert record.error.type == "HubPushError"
        assert f"{org}/merged" in record.error.message and "500" in record.error.message
        assert list(standin.snapshot(f"{org}/merged")) == [".gitattributes"]

        retried = http.post(f"/v1/jobs/{job['id']}/retry").json()
        record = _wait(store, retried["id"])
        assert record.status == "succeeded", record.error
        states = [e.data["status"] for e in store.events(retried["id"]) if e.type == "state"]
        assert states == ["queued", "validating", "running", "pushing", "succeeded"]
        head = standin.repo(f"{org}/merged").resolve("main")
        assert record.result.destination == f"hub://{org}/merged"
        assert record.result.revision == head.sha
        assert record.result.url == f"{standin.url}/{org}/merged/commit/{head.sha}"
        assert f"{source_repo}@{sha}" in head.message
        everything = json.dumps(http.get(f"/v1/jobs/{retried['id']}").json()) \
            + json.dumps(http.get("/v1/jobs").json())
    assert TOKEN not in everything
    assert TOKEN not in worker.output()
    # the API's preflight read the weights' header (a range), the worker downloaded them once
    reads = [(r.headers.get("range"), r.status) for r in standin.requests
             if r.repo_id == source_repo and r.filename == "model.safetensors"
             and r.sent_content]
    assert reads.count((None, 200)) == 1 and ("bytes=0-65535", 206) in reads, reads


def _wait(store: JobStore, job_id: str) -> JobRecord:
    return wait_for(lambda: (r := store.get(job_id)) and r.status in TERMINAL and r,
                    timeout=240, interval=0.1, what=f"job {job_id}")
