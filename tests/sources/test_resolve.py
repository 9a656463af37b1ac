"""`HubOptions`: a Hub token is configuration, never printed."""

from __future__ import annotations

from pathlib import Path

from merge_service.sources.resolve import HubOptions


def test_hub_token_is_not_in_the_repr() -> None:
    token = "hf_secretsecretsecretsecret"
    options = HubOptions(endpoint="http://127.0.0.1:1", token=token, cache_dir=Path("/c"))
    assert token not in repr(options) and token not in str(options)
    assert "http://127.0.0.1:1" in repr(options)  # the rest stays visible for debugging
    assert options.token == token
