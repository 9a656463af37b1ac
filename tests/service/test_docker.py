"""docker-compose.yml and docker/: they cannot run here, so check what can be checked: the
compose file parses and is wired consistently, the commands it runs exist in our CLI, every
variable of the env files is a setting, the Dockerfiles copy files that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from api.cli import check_bind
from merge_service.cli import build_parser
from merge_service.errors import InvalidInputError
from merge_service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def env_file(path: Path) -> dict[str, str]:
    entries = {}
    for line in path.read_text().splitlines():
        line = line.strip().lstrip("# ").strip() if line.startswith("# MERGE") else line
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            entries[key] = value
    return entries


def test_compose_services(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "api", "worker", "scheduler"}
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert redis["command"][redis["command"].index("--appendonly") + 1] == "yes"
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    for name in ("api", "worker", "scheduler"):
        service = services[name]
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "data:/data" in service["volumes"]
        assert (ROOT / service["build"]["dockerfile"]).is_file()
        assert service["build"]["context"] == "."
        files = [e["path"] for e in service["env_file"]]
        assert files[0] == "docker/defaults.env" and (ROOT / files[0]).is_file()
        # the keys: compose says at once that the file is missing, instead of an API that
        # restarts forever
        assert service["env_file"][1] == {"path": "docker/service.env", "required": True}
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert set(compose["volumes"]) == {"data", "redis"}


def test_compose_commands_exist_in_the_cli(compose: dict) -> None:
    parser = build_parser()
    for name in ("api", "worker", "scheduler"):
        program, *argv = compose["services"][name]["command"]
        assert program == "merge-service"
        args = parser.parse_args(argv)
        assert args.command == name and callable(args.func)
    api = parser.parse_args(compose["services"]["api"]["command"][1:])
    assert compose["services"]["api"]["ports"][0].endswith(f":{api.port}")


def test_env_files_name_only_settings_and_point_at_the_compose_redis(compose: dict) -> None:
    fields = {f"MERGE_SERVICE_{name.upper()}" for name in Settings.model_fields}
    defaults = env_file(ROOT / "docker/defaults.env")
    example = env_file(ROOT / "docker/service.env.example")
    for key in {**defaults, **example}:
        assert key in fields or key.startswith("HF_"), key
    assert defaults["MERGE_SERVICE_REDIS_URL"].startswith("redis://redis:6379")
    assert defaults["MERGE_SERVICE_DATA_DIR"] == "/data"
    assert defaults["MERGE_SERVICE_LOCAL_ROOTS"] == "/data"  # specs stay on the shared volume
    assert "MERGE_SERVICE_API_KEYS" in example
    # a copy left as it is serves no one with a key written in this repository: the API,
    # on all interfaces in its container, refuses to start without keys
    unedited = Settings(api_keys=example["MERGE_SERVICE_API_KEYS"] or None)
    with pytest.raises(InvalidInputError, match="MERGE_SERVICE_API_KEYS"):
        check_bind("0.0.0.0", unedited)
    settings = Settings(**{k.removeprefix("MERGE_SERVICE_").lower(): v
                           for k, v in defaults.items() if k.startswith("MERGE_SERVICE_")})
    assert settings.max_job_seconds >= 3600


@pytest.mark.parametrize("image", ["api", "worker"])
def test_dockerfiles_copy_what_exists_and_run_our_commands(image: str) -> None:
    dockerfile = (ROOT / f"docker/{image}.Dockerfile").read_text()
    ignore = (ROOT / f"docker/{image}.Dockerfile.dockerignore").read_text().split()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, _ = shlex.split(line)[1:]
            for source in sources:
                assert (ROOT / source).exists(), source
                assert source in allowed, f"{source} is excluded by the .dockerignore"
    cmd = re.search(r'^CMD (\[.*\])$', dockerfile, re.M)
    assert cmd is not None
    program, *argv = yaml.safe_load(cmd[1])
    assert program == "merge-service" and build_parser().parse_args(argv).command == image
    assert "ENV" in dockerfile and "MERGE_SERVICE_DATA_DIR=/data" in dockerfile
    if image == "worker":
        assert re.search(r"^FROM pytorch/pytorch:\S+-cuda\S+", dockerfile, re.M)


def test_cpu_override_drops_only_the_gpu_reservation(compose: dict) -> None:
    """`docker-compose.cpu.yml` resets the worker's `deploy` (compose's `!reset` tag) and
    nothing else; the worker's queues stay `auto`, so without CUDA it serves `cpu`."""

    class ComposeLoader(yaml.SafeLoader):
        pass

    ComposeLoader.add_constructor("!reset", lambda loader, node: ("reset", node.value))
    override = yaml.load((ROOT / "docker-compose.cpu.yml").read_text(), Loader=ComposeLoader)
    assert override == {"services": {"worker": {"deploy": ("reset", [])}}}  # `!reset {}`
    assert "deploy" in compose["services"]["worker"]
    assert env_file(ROOT / "docker/defaults.env")["MERGE_SERVICE_WORKER_QUEUES"] == "auto"
    readme = (ROOT / "README.md").read_text()
    assert "-f docker-compose.yml -f docker-compose.cpu.yml" in readme
