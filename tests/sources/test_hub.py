"""Hub sources, through the real `huggingface_hub` client talking HTTP to a local Hub stand-in.

Nothing of `huggingface_hub` is mocked: repos hold real safetensors checkpoints and PEFT adapters,
and every request the client makes is recorded by the stand-in (`tests/hubstandin`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import load_file, save

import tests.hubstandin
from merge_service.engine import run_merge
from merge_service.errors import Problem
from merge_service.sources.checkpoint import Checkpoint
from merge_service.sources.lora import LoraAdapter, is_adapter_dir
from merge_service.sources.resolve import HubOptions, ResolvedSource, resolve_source
from merge_service.spec import spec_from_dict
from tests.hubstandin import HubStandIn

hub = tests.hubstandin.hub  # the fixture: a started stand-in, huggingface_hub pointed at it

TOKEN = "hf_standin_secret_token_0123456789"
SHA = re.compile(r"[0-9a-f]{40}")
SHAPES = {
    "model.embed_tokens.weight": (16, 8),
    "model.layers.0.self_attn.q_proj.weight": (8, 8),
    "model.layers.0.self_attn.q_proj.bias": (8,),
    "model.layers.0.mlp.up_proj.weight": (12, 8),
    "model.norm.weight": (8,),
    "lm_head.weight": (16, 8),
}


# --- small real checkpoints, as the bytes a repo holds ------------------------------------------

def tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items()}


def finetune(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: value + 0.1 * torch.randn(value.shape, generator=gen)
            for name, value in base.items()}


def config(name: str) -> bytes:
    return json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                       "_name_or_path": name, "hidden_size": 8}).encode()


def model_repo(name: str, weights: dict[str, torch.Tensor]) -> dict[str, bytes]:
    return {"config.json": config(name), "model.safetensors": save(weights)}


def sharded_repo(name: str, weights: dict[str, torch.Tensor]) -> dict[str, bytes]:
    """Two shards and their index, as `save_pretrained(max_shard_size=...)` writes them."""
    names = sorted(weights)
    halves = {"model-00001-of-00002.safetensors": names[:3],
              "model-00002-of-00002.safetensors": names[3:]}
    files = {"config.json": config(name)}
    weight_map = {}
    for shard, keys in halves.items():
        files[shard] = save({k: weights[k] for k in keys})
        weight_map |= dict.fromkeys(keys, shard)
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": sum(v.numel() * 4 for v in weights.values())},
         "weight_map": weight_map}).encode()
    return files


def adapter_repo(base_name: str, seed: int, rank: int = 2) -> dict[str, bytes]:
    """A PEFT LoRA adapter of `q_proj`: PEFT's file names, config keys and tensor names."""
    gen = torch.Generator().manual_seed(seed)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    weights = {f"{prefix}.lora_A.weight": torch.randn(rank, 8, generator=gen),
               f"{prefix}.lora_B.weight": torch.randn(8, rank, generator=gen)}
    adapter_config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
                      "lora_alpha": 2 * rank, "target_modules": ["q_proj"],
                      "base_model_name_or_path": base_name, "fan_in_fan_out": False}
    return {"adapter_config.json": json.dumps(adapter_config).encode(),
            "adapter_model.safetensors": save(weights)}


def options(tmp_path: Path, endpoint: str, token: str | None = None) -> HubOptions:
    return HubOptions(endpoint=endpoint, token=token, cache_dir=tmp_path / "hub-cache")


def resolve(source: str, hub: HubStandIn, tmp_path: Path, token: str | None = None,
            label: str = "base") -> tuple[ResolvedSource | None, list[Problem]]:
    return resolve_source(source, label, options(tmp_path, hub.url, token))


def resolved_ok(source: str, hub: HubStandIn, tmp_path: Path, token: str | None = None
                ) -> ResolvedSource:
    found, problems = resolve(source, hub, tmp_path, token)
    assert problems == []
    assert found is not None
    return found


def files_in(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def assert_same_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
                        ) -> None:
    assert actual.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=0, msg=name)


# --- the stand-in speaks the Hub's protocol to the real client ---------------------------------

def test_standin_answers_the_client_with_its_own_error_types(hub: HubStandIn,
                                                             tmp_path: Path) -> None:
    hub.add_repo("org/model", model_repo("org/model", tensors(0)))
    hub.add_repo("org/gated", model_repo("org/gated", tensors(0)), gated="auto")
    api = HfApi(endpoint=hub.url)

    def download(repo_id: str, filename: str) -> str:
        return hf_hub_download(repo_id, filename, endpoint=hub.url, cache_dir=tmp_path / "c")

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/model", revision="no-such-branch")
    with pytest.raises(EntryNotFoundError):
        download("org/model", "no-such-file.json")
    with pytest.raises(GatedRepoError):
        download("org/gated", "config.json")
    assert api.model_info("org/gated").gated == "auto"  # info stays public, as on the Hub


def test_standin_serves_lfs_files_through_a_cdn_origin_without_the_token(
        hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_token(TOKEN)
    weights = tensors(0)
    sha = hub.add_repo("org/model", model_repo("org/model", weights))

    path = snapshot_download("org/model", endpoint=hub.url, token=TOKEN,
                             cache_dir=tmp_path / "c")

    assert Path(path).name == sha
    assert_same_tensors(load_file(Path(path) / "model.safetensors"), weights)
    weights_get = [r for r in hub.requests if r.filename == "model.safetensors"
                   and r.method == "GET"]
    assert [(r.server, r.status) for r in weights_get] == [("cdn", 200)]
    assert weights_get[0].token is None  # the client drops it for another origin
    assert all(r.token == TOKEN for r in hub.requests if r.server == "hub")
    # No Xet metadata: hf_xet, installed or not, is never asked to download.
    assert not any(name.startswith("x-xet") for r in hub.requests for name in r.response_headers)
    head = next(r for r in hub.requests if r.filename == "model.safetensors"
                and r.method == "HEAD")
    assert head.status == 302 and head.response_headers["x-repo-commit"] == sha
    assert head.response_headers["location"].startswith(hub.cdn_url)


# --- resolve_source: revisions are pinned to commit shas --------------------------------------

def test_branch_is_pinned_to_its_head_commit_and_files_come_from_that_commit(
        hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_repo("org/base", model_repo("org/base", tensors(0)))
    v2 = tensors(1)
    head = hub.add_commit("org/base", {"model.safetensors": save(v2)}, message="retrain")

    for source in ("org/base", "org/base@main"):
        found = resolved_ok(source, hub, tmp_path)
        assert found.repo_id == "org/base"
        assert found.revision == head
        assert found.pinned == f"org/base@{head}"
        assert found.source == source
        assert_same_tensors(load_file(found.path / "model.safetensors"), v2)
    # Files are fetched at the sha model_info returned, never at the moving branch name.
    downloads = [r for r in hub.requests if r.route == "_resolve"]
    assert downloads and {r.revision for r in downloads} == {head}


def test_short_sha_and_tag_resolve_to_the_full_sha_of_an_older_commit(
        hub: HubStandIn, tmp_path: Path) -> None:
    v1 = tensors(0)
    first = hub.add_repo("org/base", model_repo("org/base", v1))
    hub.add_commit("org/base", {"model.safetensors": save(tensors(1))})
    hub.create_tag("org/base", "v1.0", first)

    for revision in (first[:7], "v1.0", first):
        found = resolved_ok(f"org/base@{revision}", hub, tmp_path)
        assert found.revision == first
        assert found.pinned == f"org/base@{first}"
        assert_same_tensors(load_file(found.path / "model.safetensors"), v1)


# --- resolve_source: only the files a merge needs ---------------------------------------------

def test_full_model_fetches_safetensors_config_and_tokenizer_only(hub: HubStandIn,
                                                                  tmp_path: Path) -> None:
    weights = tensors(0)
    metadata = {"config.json": config("org/base"),
                "generation_config.json": b'{"max_length": 32}',
                "tokenizer.json": b'{"version": "1.0"}',
                "tokenizer_config.json": b'{"model_max_length": 32}',
                "special_tokens_map.json": b'{"eos_token": "</s>"}'}
    hub.add_repo("org/base", {
        **metadata,
        "model.safetensors": save(weights),
        "pytorch_model.bin": b"pickled weights we must never fetch",
        "consolidated.safetensors": save(tensors(5)),
        "README.md": b"# a model card",
        ".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n",
    })

    found = resolved_ok("org/base", hub, tmp_path)

    needed = {*metadata, "model.safetensors"}
    assert files_in(found.path) == needed
    assert sorted(hub.downloaded("org/base")) == sorted(needed)  # each one once
    named = hub.requested_files("org/base")
    for unwanted in ("pytorch_model.bin", "consolidated.safetensors", "README.md"):
        assert unwanted not in named
    assert_same_tensors(load_file(found.path / "model.safetensors"), weights)


def test_sharded_model_fetches_the_index_and_only_the_shards_it_lists(hub: HubStandIn,
                                                                      tmp_path: Path) -> None:
    weights = tensors(0)
    files = sharded_repo("org/sharded", weights)
    hub.add_repo("org/sharded", {
        **files,
        "model-00001-of-00003.safetensors": save(tensors(7)),  # left over from an older layout
        "pytorch_model.bin.index.json": b'{"weight_map": {}}',
        "pytorch_model-00001-of-00001.bin": b"pickle",
    })

    found = resolved_ok("org/sharded", hub, tmp_path)

    assert files_in(found.path) == set(files)
    assert sorted(hub.downloaded("org/sharded")) == sorted(files)
    checkpoint, problems = Checkpoint.open(found.path, "base")
    assert problems == [] and checkpoint is not None
    assert_same_tensors({n: checkpoint.get(n) for n in checkpoint.tensors}, weights)
    checkpoint.close()


def test_adapter_fetches_its_config_and_safetensors_weights_only(hub: HubStandIn,
                                                                 tmp_path: Path) -> None:
    files = adapter_repo("org/base", seed=3)
    hub.add_repo("org/lora", {
        **files,
        "adapter_model.bin": b"pickle",
        "training_args.bin": b"pickle",
        "tokenizer.json": b"{}",
        "tokenizer_config.json": b"{}",
        "README.md": b"# adapter",
    })

    found = resolved_ok("org/lora", hub, tmp_path)

    assert files_in(found.path) == {"adapter_config.json", "adapter_model.safetensors"}
    assert hub.requested_files("org/lora") == {"adapter_config.json",
                                               "adapter_model.safetensors"}
    assert is_adapter_dir(found.path)
    adapter, problems = LoraAdapter.open(found.path, "lora", set(SHAPES))
    assert problems == [] and adapter is not None
    assert set(adapter.modules) == {"model.layers.0.self_attn.q_proj.weight"}
    assert adapter.base_model_name == "org/base"


# --- resolve_source: what cannot be resolved is a Problem, not an exception -------------------

def test_missing_repo_is_a_problem(hub: HubStandIn, tmp_path: Path) -> None:
    found, problems = resolve("org/missing", hub, tmp_path, label="math")
    assert found is None
    assert [(p.model, p.message) for p in problems] == [
        ("math", "Hub repo org/missing not found (or no access with the configured token)")]


def test_missing_revision_is_a_problem(hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_repo("org/base", model_repo("org/base", tensors(0)))
    found, problems = resolve("org/base@no-such-branch", hub, tmp_path)
    assert found is None
    assert [p.message for p in problems] == [
        "revision 'no-such-branch' not found in Hub repo org/base"]
    assert hub.downloaded() == []


def test_repo_without_safetensors_is_a_problem_and_nothing_is_downloaded(
        hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_repo("org/pickled", {"config.json": config("org/pickled"),
                                 "pytorch_model.bin": b"pickle"})
    found, problems = resolve("org/pickled", hub, tmp_path)
    assert found is None
    assert len(problems) == 1
    assert "org/pickled has no safetensors weights" in problems[0].message
    assert hub.downloaded() == []


def test_gated_repo_without_access_is_a_problem_and_with_access_resolves(
        hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_token(TOKEN)
    hub.add_token("hf_other_user_token")
    sha = hub.add_repo("org/gated", model_repo("org/gated", tensors(0)), gated="manual")

    for token in (None, "hf_other_user_token"):  # anonymous (401), signed in but not granted (403)
        found, problems = resolve("org/gated", hub, tmp_path, token=token)
        assert found is None
        assert [p.message for p in problems] == [
            "Hub repo org/gated is gated: configure a token with access"]
    assert hub.downloaded() == []

    hub.grant("org/gated", TOKEN)
    assert resolved_ok("org/gated", hub, tmp_path, token=TOKEN).revision == sha


def test_private_repo_needs_a_token_with_access(hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_token(TOKEN)
    sha = hub.add_repo("org/private", model_repo("org/private", tensors(0)), private=True,
                       readers=[TOKEN])
    found, problems = resolve("org/private", hub, tmp_path)
    assert found is None
    assert "org/private not found (or no access" in problems[0].message
    assert resolved_ok("org/private", hub, tmp_path, token=TOKEN).revision == sha


def test_unreachable_hub_is_a_problem(tmp_path: Path, hub: HubStandIn) -> None:
    # `hub` only isolates huggingface_hub (caches, token, telemetry); the endpoint is elsewhere.
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    found, problems = resolve_source("org/base", "base",
                                     options(tmp_path, f"http://127.0.0.1:{port}"))
    assert found is None
    assert len(problems) == 1
    assert problems[0].message.startswith("cannot fetch Hub repo org/base: ")


# --- tokens: sent to the Hub as a Bearer header, nowhere else, never in a message -------------

def test_configured_token_is_sent_as_bearer_to_the_hub_only(hub: HubStandIn,
                                                            tmp_path: Path) -> None:
    hub.add_token(TOKEN)
    hub.add_repo("org/base", sharded_repo("org/base", tensors(0)))

    resolved_ok("org/base", hub, tmp_path, token=TOKEN)

    to_hub = [r for r in hub.requests if r.server == "hub"]
    to_cdn = [r for r in hub.requests if r.server == "cdn"]
    assert to_hub and to_cdn
    assert {r.headers.get("authorization") for r in to_hub} == {f"Bearer {TOKEN}"}
    assert all("authorization" not in r.headers for r in to_cdn)


def test_without_a_configured_token_none_is_sent(hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_repo("org/base", model_repo("org/base", tensors(0)))
    resolved_ok("org/base", hub, tmp_path)
    assert hub.requests
    assert all("authorization" not in r.headers for r in hub.requests)


def test_token_never_appears_in_problems(hub: HubStandIn, tmp_path: Path) -> None:
    hub.add_token(TOKEN)
    hub.add_repo("org/gated", model_repo("org/gated", tensors(0)), gated="auto")
    hub.add_repo("org/base", model_repo("org/base", tensors(0)))
    problems = []
    for source, token in (("org/missing", TOKEN), ("org/gated", TOKEN),
                          ("org/base@nope", TOKEN), ("org/base", "hf_revoked_token_42")):
        found, found_problems = resolve(source, hub, tmp_path, token=token)
        assert found is None and len(found_problems) == 1
        problems += found_problems
    assert any(r.token == "hf_revoked_token_42" and r.status == 401 for r in hub.requests)
    for problem in problems:
        text = f"{problem} {problem.to_dict()}"
        assert TOKEN not in text and "hf_revoked_token_42" not in text
        assert "hf_" not in text


# --- end to end: run_merge on Hub sources ----------------------------------------------------

def test_run_merge_on_hub_sources_pins_revisions_and_merges_exactly(hub: HubStandIn,
                                                                    tmp_path: Path) -> None:
    base = tensors(0)
    task_a_v1, task_a_v2, task_b = finetune(base, 1), finetune(base, 2), finetune(base, 3)
    base_sha = hub.add_repo("org/base", {**model_repo("org/base", base),
                                         "tokenizer.json": b'{"version": "1.0"}'})
    a_sha = hub.add_repo("org/task-a", model_repo("org/task-a", task_a_v1))
    hub.create_tag("org/task-a", "v1", a_sha)
    hub.add_commit("org/task-a", {"model.safetensors": save(task_a_v2)})  # main moves on
    b_sha = hub.add_repo("org/task-b", sharded_repo("org/task-b", task_b))
    alpha, weights = 0.7, (1.0, 0.5)
    destination = tmp_path / "merged"
    spec = spec_from_dict({
        "base": "org/base",
        "models": [{"source": "org/task-a@v1", "weight": weights[0], "name": "a"},
                   {"source": "org/task-b", "weight": weights[1], "name": "b"}],
        "method": {"name": "task_arithmetic", "params": {"alpha": alpha}},
        "output": {"destination": str(destination)},
        "options": {"device": "cpu"},
    })

    result = run_merge(spec, hub=options(tmp_path, hub.url))

    assert result.destination == destination.resolve()
    assert {"model.safetensors", "config.json", "tokenizer.json", "merge_spec.yaml",
            "merge_report.json", "README.md"} <= files_in(destination)
    assert (destination / "config.json").read_bytes() == config("org/base")

    pinned = yaml.safe_load((destination / "merge_spec.yaml").read_text())
    assert pinned["base"] == f"org/base@{base_sha}"
    assert [m["source"] for m in pinned["models"]] == [f"org/task-a@{a_sha}",
                                                        f"org/task-b@{b_sha}"]
    for source in [pinned["base"], *(m["source"] for m in pinned["models"])]:
        assert SHA.fullmatch(source.split("@", 1)[1])

    report = json.loads((destination / "merge_report.json").read_text())
    assert report["base"]["revision"] == base_sha
    assert [(m["name"], m["revision"], m["source"]) for m in report["models"]] == [
        ("a", a_sha, f"org/task-a@{a_sha}"), ("b", b_sha, f"org/task-b@{b_sha}")]
    card = (destination / "README.md").read_text()
    assert f"org/task-a@{a_sha}" in card and f"org/task-b@{b_sha}" in card

    merged = load_file(destination / "model.safetensors")
    assert merged.keys() == base.keys()
    for name, theta0 in base.items():
        task_sum = weights[0] * (task_a_v1[name] - theta0) + weights[1] * (task_b[name] - theta0)
        expected = theta0 + alpha * task_sum
        assert merged[name].dtype == torch.float32
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-6, msg=name)
        # task-a's newer commit on main was not used
        assert not torch.allclose(merged[name], theta0 + alpha * (
            weights[0] * (task_a_v2[name] - theta0) + weights[1] * (task_b[name] - theta0)))


# --- preflight alone: the safetensors headers, not the weights ------------------------------

def headers_options(tmp_path: Path, endpoint: str) -> HubOptions:
    return HubOptions(endpoint=endpoint, cache_dir=tmp_path / "hub-cache",
                      headers_dir=tmp_path / "preflight-headers")


def weight_reads(hub: HubStandIn, repo_id: str) -> list[tuple[str, str, int]]:
    """(file, Range asked, status) of every request that sent a safetensors file's bytes."""
    return [(r.filename, r.headers.get("range", ""), r.status) for r in hub.requests
            if r.repo_id == repo_id and r.sent_content and r.filename.endswith(".safetensors")]


def infos(directory: Path) -> dict[str, tuple]:
    checkpoint, problems = Checkpoint.open(directory, "base")
    assert problems == [] and checkpoint is not None
    found = {name: (i.file.name, i.dtype, i.shape, i.offset)
             for name, i in checkpoint.tensors.items()}
    checkpoint.close()
    return found


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_headers_only_reads_each_header_and_no_weights(hub: HubStandIn, tmp_path: Path,
                                                       layout: str) -> None:
    weights = {**tensors(0), "model.layers.0.mlp.down_proj.weight": torch.randn(512, 1024)}
    files = (model_repo if layout == "single" else sharded_repo)("org/big", weights)
    files["tokenizer.json"] = b'{"version": "1.0"}'
    sha = hub.add_repo("org/big", files)

    found, problems = resolve_source("org/big", "base", headers_options(tmp_path, hub.url),
                                     weights=False)

    assert problems == [] and found is not None and found.revision == sha
    assert found.path == tmp_path / "preflight-headers" / "org/big" / sha
    reads = weight_reads(hub, "org/big")
    assert reads and all(r == "bytes=0-65535" and status == 206 for _, r, status in reads)
    real = resolved_ok("org/big", hub, tmp_path / "full")  # the files a merge downloads
    assert files_in(found.path) == files_in(real.path)
    assert infos(found.path) == infos(real.path)
    for name in files_in(real.path):
        stub, whole = found.path / name, real.path / name
        assert stub.stat().st_size == whole.stat().st_size
        if name.endswith(".safetensors") and whole.stat().st_size > 1 << 20:
            assert stub.stat().st_blocks * 512 < 1 << 20  # a sparse file: the header only
    hub.clear_requests()
    resolve_source("org/big", "base", headers_options(tmp_path, hub.url), weights=False)
    assert weight_reads(hub, "org/big") == []  # made once per commit


def test_header_copies_no_preflight_used_for_a_week_are_removed(
        hub: HubStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import merge_service.sources.resolve as resolve

    options = headers_options(tmp_path, hub.url)
    copies = {}
    for repo in ("org/kept", "org/stale", "other/stale"):
        hub.add_repo(repo, model_repo(repo, tensors(0)))
        found, problems = resolve_source(repo, "base", options, weights=False)
        assert problems == [] and found is not None
        copies[repo] = found.path
    week_ago = time.time() - 8 * 86400
    for path in copies.values():
        os.utime(path, (week_ago, week_ago))
    monkeypatch.setattr(resolve, "_pruned_at", -float("inf"))  # pruning is due
    hub.clear_requests()
    found, _ = resolve_source("org/kept", "base", options, weights=False)  # used again
    assert found is not None and found.path == copies["org/kept"]
    assert weight_reads(hub, "org/kept") == []  # kept: nothing fetched again
    assert not copies["org/stale"].exists() and not copies["other/stale"].exists()
    headers = tmp_path / "preflight-headers"
    assert sorted(p.name for p in headers.iterdir()) == ["org"]  # `other/` went with its copy
    assert sorted(p.name for p in (headers / "org").iterdir()) == ["kept"]
    # at most once an hour: a copy that goes stale now stays until the next pruning
    os.utime(copies["org/kept"], (week_ago, week_ago))
    resolve_source("org/stale", "base", options, weights=False)
    assert copies["org/kept"].exists()


def test_a_header_longer_than_the_first_read_takes_a_second_range(hub: HubStandIn,
                                                                  tmp_path: Path) -> None:
    many = {f"model.layers.{i}.scale": torch.ones(2) for i in range(1500)}  # ~100 KB header
    hub.add_repo("org/many", model_repo("org/many", many))

    found, problems = resolve_source("org/many", "base", headers_options(tmp_path, hub.url),
                                     weights=False)

    assert problems == [] and found is not None
    header_end = 8 + int.from_bytes(save(many)[:8], "little")
    assert header_end > 65536
    assert [r for _, r, _ in weight_reads(hub, "org/many")] == [
        "bytes=0-65535", f"bytes=65536-{header_end - 1}"]
    assert set(infos(found.path)) == set(many)


def test_headers_only_from_a_server_that_ignores_ranges(hub: HubStandIn,
                                                        tmp_path: Path) -> None:
    """A mirror that answers every range with the whole file (200): the header is still
    taken from its first bytes, and the stand-ins are the same."""
    many = {f"model.layers.{i}.scale": torch.ones(2) for i in range(1500)}  # a long header
    hub.add_repo("org/many", model_repo("org/many", many))
    hub.honour_range = False

    found, problems = resolve_source("org/many", "base", headers_options(tmp_path, hub.url),
                                     weights=False)

    assert problems == [] and found is not None
    assert {status for _, _, status in weight_reads(hub, "org/many")} == {200}
    assert set(infos(found.path)) == set(many)


def test_headers_only_still_finds_a_truncated_file(hub: HubStandIn, tmp_path: Path) -> None:
    whole = save(tensors(0))
    hub.add_repo("org/cut", {"config.json": config("org/cut"), "model.safetensors": whole[:-64]})

    found, problems = resolve_source("org/cut", "base", headers_options(tmp_path, hub.url),
                                     weights=False)

    assert problems == [] and found is not None
    checkpoint, problems = Checkpoint.open(found.path, "base")
    assert checkpoint is None and len(problems) == 1
    assert "truncated" in problems[0].message


def test_preflight_without_weights_then_the_merge(hub: HubStandIn, tmp_path: Path) -> None:
    """`prepare(weights=False)` (the API's check) fetches headers only; the merge after it,
    as a worker runs it, downloads each weights file once and merges exactly."""
    from merge_service.engine import prepare

    base, task_a, task_b = tensors(0), finetune(tensors(0), 1), finetune(tensors(0), 2)
    hub.add_repo("org/base", model_repo("org/base", base))
    hub.add_repo("org/task-a", model_repo("org/task-a", task_a))
    hub.add_repo("org/task-b", sharded_repo("org/task-b", task_b))
    spec = spec_from_dict({
        "base": "org/base", "models": [{"source": "org/task-a"}, {"source": "org/task-b"}],
        "method": {"name": "task_arithmetic", "params": {"alpha": 1.0}},
        "output": {"destination": str(tmp_path / "merged")}, "options": {"device": "cpu"}})
    options = headers_options(tmp_path, hub.url)

    prepare(spec, hub=options, weights=False).close()

    for repo in ("org/base", "org/task-a", "org/task-b"):
        assert all(status == 206 for _, _, status in weight_reads(hub, repo))
    hub.clear_requests()
    result = run_merge(spec, hub=options)
    merged = load_file(result.destination / "model.safetensors")
    for name, theta0 in base.items():
        expected = theta0 + (task_a[name] - theta0) + (task_b[name] - theta0)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    for repo in ("org/base", "org/task-a", "org/task-b"):
        reads = weight_reads(hub, repo)
        assert reads and all(r == "" and status == 200 for _, r, status in reads)
        assert len(reads) == len({f for f, _, _ in reads})  # each file once


def test_a_merge_that_fails_preflight_downloads_no_weight(hub: HubStandIn,
                                                         tmp_path: Path) -> None:
    """`run_merge` checks Hub sources on their headers before it downloads anything: a spec
    with a problem (here, a destination that exists) costs header reads only."""
    from merge_service.errors import PreflightError

    base = tensors(0)
    hub.add_repo("org/base", model_repo("org/base", base))
    hub.add_repo("org/task-a", model_repo("org/task-a", finetune(base, 1)))
    hub.add_repo("org/task-b", model_repo("org/task-b", finetune(base, 2)))
    (tmp_path / "merged").mkdir()
    spec = spec_from_dict({
        "base": "org/base", "models": [{"source": "org/task-a"}, {"source": "org/task-b"}],
        "method": {"name": "task_arithmetic"},
        "output": {"destination": str(tmp_path / "merged")}, "options": {"device": "cpu"}})

    with pytest.raises(PreflightError, match="already exists"):
        run_merge(spec, hub=headers_options(tmp_path, hub.url))

    for repo in ("org/base", "org/task-a", "org/task-b"):
        reads = weight_reads(hub, repo)
        assert reads and all(status == 206 for _, _, status in reads), reads
