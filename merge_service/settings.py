"""Configuration from `MERGE_SERVICE_*` environment variables (DESIGN.md section 7)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from merge_service.sources.resolve import HubOptions


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGE_SERVICE_", extra="ignore")

    redis_url: str | None = Field(None, description="unset: `up` starts an embedded Redis")
    data_dir: Path = Field(Path.home() / ".local/share/merge-service",
                           description="local artifacts, Hub cache, embedded Redis data")
    api_keys: SecretStr | None = Field(None, description="KEY:ROLE[,KEY:ROLE...]")
    hf_token: SecretStr | None = None
    hf_endpoint: str | None = None
    max_job_seconds: int = Field(6 * 3600, ge=60)
    worker_queues: str = Field("auto", description="auto, cpu, gpu or cpu,gpu")

    @cached_property
    def hub(self) -> HubOptions:
        return HubOptions(
            endpoint=self.hf_endpoint,
            token=self.hf_token.get_secret_value() if self.hf_token else None,
            cache_dir=self.data_dir / "hub-cache",
        )
