"""Configuration from `MERGE_SERVICE_*` environment variables (DESIGN.md section 7)."""

from __future__ import annotations

from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from merge_service.errors import PreflightError, Problem
from merge_service.sources.resolve import HubOptions


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MERGE_SERVICE_", extra="ignore")

    redis_url: str | None = Field(None, description="unset: `up` starts an embedded Redis")
    data_dir: Path = Field(Path.home() / ".local/share/merge-service",
                           description="local artifacts, Hub cache, embedded Redis data")
    api_keys: SecretStr | None = Field(None, description="KEY:ROLE[,KEY:ROLE...]")
    hf_token: SecretStr | None = None
    hf_endpoint: str | None = None
    local_roots: str | None = Field(
        None, description="DIR[,DIR...]: the only local paths that specs sent to the API (jobs, "
        "validations, schedules) may read or write; unset: any path the service can reach")
    secrets_dir: Path = Field(Path("/run/secrets"), description="where a schedule's "
                              "`hf_token_secret` NAME is read from: the file SECRETS_DIR/NAME")
    max_job_seconds: int = Field(6 * 3600, ge=60)
    job_retention_days: float | None = Field(
        None, gt=0, description="jobs that ended this many days ago are deleted (record, "
        "events, report; not their outputs); unset: kept")
    worker_queues: str = Field("auto", description="auto, cpu, gpu or cpu,gpu")
    # the service (api/, workers/)
    max_request_bytes: int = Field(1 << 20, ge=1024, description="largest accepted API body")
    job_cpu_priority: Literal["idle", "low", "normal"] = Field(
        "idle", description="CPU priority of running merges: idle (they run only on CPU time "
        "nothing else wants, so the API and heartbeats are never kept waiting), low (nice 10), "
        "normal")
    heartbeat_seconds: float = Field(10.0, gt=0, description="worker heartbeat; a job lock "
                                     "or worker record expires after 3 missed beats")
    # the client side of `merge-service submit`
    api_url: str = Field("http://127.0.0.1:8000", description="where `submit` finds the API")
    api_key: SecretStr | None = Field(None, description="the key `submit` sends")

    @property
    def redis_url_or_default(self) -> str:
        """`REDIS_URL`, else the usual local server (`up` starts an embedded one instead)."""
        return self.redis_url or "redis://127.0.0.1:6379/0"

    @cached_property
    def schedule_inputs_dir(self) -> Path:
        """Where schedules copy the local adapters their jobs merge (`workers.schedules`)."""
        return self.data_dir.expanduser().resolve() / "schedule-inputs"

    @cached_property
    def local_root_paths(self) -> list[Path]:
        """`LOCAL_ROOTS` as absolute directories, links resolved, with the service's own copies
        of schedules' adapters, which their jobs read (empty: no restriction)."""
        roots = [Path(d.strip()).expanduser().resolve()
                 for d in (self.local_roots or "").split(",") if d.strip()]
        return [*roots, self.schedule_inputs_dir] if roots else []

    def hub_for(self, secret: str | None) -> HubOptions:
        """`hub`, with the token of the secret named `secret` when one is named (a schedule's
        `hf_token_secret`); `PreflightError` when it cannot be read. Read at each use: a
        rotated secret takes effect at the next job."""
        if secret is None:
            return self.hub
        if not secret or secret.startswith(".") or "/" in secret or "\\" in secret:
            raise PreflightError(Problem(f"{secret!r} is not a secret's name",
                                         field="hf_token_secret"))
        path = self.secrets_dir / secret
        try:
            token = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise PreflightError(Problem(f"cannot read the Hub token secret {secret!r} "
                                         f"({path}): {reason}", field="hf_token_secret")) \
                from None
        if not token:
            raise PreflightError(Problem(f"the Hub token secret {secret!r} ({path}) is empty",
                                         field="hf_token_secret"))
        return replace(self.hub, token=token)

    @cached_property
    def hub(self) -> HubOptions:
        return HubOptions(
            endpoint=self.hf_endpoint,
            token=self.hf_token.get_secret_value() if self.hf_token else None,
            cache_dir=self.data_dir / "hub-cache",
            staging_dir=self.data_dir / "staging",
            headers_dir=self.data_dir / "preflight-headers",
        )
