"""Scheduled merges against a real Redis, a real worker and real scheduler processes
(`merge-service scheduler`, Celery beat on celery-redbeat) with seconds-level schedules
(`every_seconds`, and 6-field cron, seconds first); the API in-process. Collections: local
directories of PEFT adapters of MiniLM (saved by `peft`), and a Hub collection on the HTTP
stand-in of the Hub, which the real `huggingface_hub` client reads.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file

from api.app import create_app
from tests.hubstandin import HubStandIn, isolate_hf_environment
from tests.hubstandin.server import hub_error, json_response
from tests.service.conftest import (
    API_KEYS,
    KEYS,
    Process,
    redis_url,
    service_env,
    service_settings,
    start_worker,
    wait_for,
)
from workers.jobs import TERMINAL, JobRecord, JobStore
from workers.redis_server import EmbeddedRedis
from workers.schedules.collections import content_hash
from workers.schedules.models import cron_schedule, rule_from
from workers.schedules.store import BEAT_LOCK_TIMEOUT_S, ScheduleStore, make_beat_app

pytestmark = pytest.mark.slow
DB = 11
HF_TOKEN = f"hf_sched_{secrets.token_hex(8)}"
HF_USER = "merger"


@dataclass
class Env:
    client: TestClient
    store: JobStore
    schedules: ScheduleStore
    env: dict[str, str]
    root: Path
    hub: HubStandIn
    base: Path
    adapters: dict[str, Path]
    schedulers: list[Process] = field(default_factory=list)
    workers: list[Process] = field(default_factory=list)

    def headers(self, role: str = "submit") -> dict[str, str]:
        return {"Authorization": f"Bearer {KEYS[role]}"}

    def post(self, path: str, role: str = "submit", **kwargs: Any) -> Any:
        return self.client.post(path, headers=self.headers(role), **kwargs)

    def get(self, path: str, role: str = "read", **kwargs: Any) -> Any:
        return self.client.get(path, headers=self.headers(role), **kwargs)

    def runs(self, schedule_id: str) -> list[dict[str, Any]]:
        response = self.get(f"/v1/schedules/{schedule_id}/runs", params={"limit": 500})
        assert response.status_code == 200, response.text
        return response.json()["runs"]

    def wait_runs(self, schedule_id: str, count: int, timeout: float = 90) -> list[dict]:
        try:
            return wait_for(lambda: (r := self.runs(schedule_id)) and len(r) >= count and r,
                            timeout=timeout, interval=0.2, what=f"{count} run(s)")
        except TimeoutError:
            print(self.logs())
            raise

    def wait_job(self, job_id: str, timeout: float = 120) -> JobRecord:
        def ended() -> JobRecord | None:
            record = self.store.get(job_id)
            return record if record and record.status in TERMINAL else None

        try:
            return wait_for(ended, timeout=timeout, interval=0.2, what=f"job {job_id}")
        except TimeoutError:
            print(self.logs())
            raise

    def start_scheduler(self, name: str) -> Process:
        scheduler = Process(["scheduler"], self.env, self.root / f"{name}.log").start()
        self.schedulers.append(scheduler)
        return scheduler

    def logs(self) -> str:
        return "\n".join(p.output()[-4000:] for p in [*self.schedulers, *self.workers])


@pytest.fixture(scope="module")
def env(redis_server: EmbeddedRedis, tmp_path_factory: pytest.TempPathFactory,
        minilm_dir: Path, minilm_adapters: dict[str, Path]) -> Iterator[Env]:
    url = redis_url(redis_server, DB)
    root = tmp_path_factory.mktemp("schedules")
    store = JobStore.from_url(url)
    store.r.flushdb()
    with HubStandIn() as hub, pytest.MonkeyPatch.context() as monkeypatch:
        hub.add_token(HF_TOKEN, HF_USER)
        isolate_hf_environment(monkeypatch, root / "hf-home", hub.url)
        from huggingface_hub import constants

        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")  # the stand-in speaks LFS uploads
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        hub_settings = {"MERGE_SERVICE_HF_ENDPOINT": hub.url, "MERGE_SERVICE_HF_TOKEN": HF_TOKEN,
                        "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
                        "HF_HOME": str(root / "hf-home-procs")}
        (root / "secrets").mkdir()  # schedules' own Hub tokens (hf_token_secret)
        env_vars = service_env(url, root / "data", MERGE_SERVICE_API_KEYS=API_KEYS,
                               MERGE_SERVICE_SECRETS_DIR=str(root / "secrets"), **hub_settings)
        app = create_app(service_settings(url, root / "data", api_keys=API_KEYS,
                                          hf_endpoint=hub.url, hf_token=HF_TOKEN,
                                          secrets_dir=root / "secrets"))
        with TestClient(app, base_url="http://127.0.0.1") as client:
            environment = Env(client, store, ScheduleStore(store, make_beat_app(
                service_settings(url, root / "data"))), env_vars, root, hub, minilm_dir,
                minilm_adapters)
            try:
                environment.workers.append(start_worker(
                    env_vars, store, root, f"sw-{secrets.token_hex(3)}@test"))
                environment.start_scheduler("scheduler-1")
                yield environment
            finally:
                for process in [*environment.schedulers, *environment.workers]:
                    process.stop()
        assert not hub.unhandled, [f"{r.method} {r.path}" for r in hub.unhandled]


def copy_adapter(source: Path, target: Path, **config: Any) -> Path:
    """A copy of a peft-saved adapter, with `config` changed in its adapter_config.json."""
    shutil.copytree(source, target)
    if config:
        path = target / "adapter_config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    return target


def retrain(adapter: Path, factor: float) -> None:
    """A new version of an adapter: every lora_B factor scaled."""
    path = adapter / "adapter_model.safetensors"
    tensors = {k: (v * factor if "lora_B" in k else v) for k, v in load_file(path).items()}
    save_file(tensors, path)


def schedule_body(env: Env, name: str, collection: dict[str, Any], destination: str, *,
                  every_seconds: int | None = 2, paused: bool = False, **extra: Any
                  ) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name, "base": str(env.base), "collection": collection,
        "template": {"method": {"name": "task_arithmetic"}, "output": {"format": "lora"},
                     "options": {"device": "cpu"}},
        "destination": destination, "paused": paused}
    if every_seconds is not None:
        body["every_seconds"] = every_seconds
    return body | extra


def create(env: Env, body: dict[str, Any], role: str = "submit") -> dict[str, Any]:
    response = env.post("/v1/schedules", role, json=body)
    assert response.status_code == 201, response.text
    assert response.headers["location"] == f"/v1/schedules/{response.json()['id']}"
    return response.json()


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


# --- the API ---------------------------------------------------------------------------------

def test_create_validates_every_problem_and_checks_roles(env: Env, tmp_path: Path) -> None:
    collection_dir = tmp_path / "collection"
    collection_dir.mkdir()
    body = schedule_body(env, "api", {"directory": str(collection_dir)}, str(tmp_path / "out"),
                         paused=True)
    assert env.post("/v1/schedules", "read", json=body).status_code == 403
    assert env.client.post("/v1/schedules", json=body).status_code == 401

    bad = [
        ({"cron": "0 2 * * *"}, "exactly one of cron, every_seconds"),
        ({"every_seconds": None}, "exactly one of cron, every_seconds"),
        ({"every_seconds": None, "cron": "61 * * * *"}, "cron '61 * * * *'"),
        ({"every_seconds": None, "cron": "* * * *"}, "expected 5 fields"),
        ({"every_seconds": None, "cron": "0 * * * * * *"},
         "expected 5 fields (minute hour day month weekday) or 6 (second minute hour day "
         "month weekday)"),
        ({"every_seconds": None, "cron": "60 * * * * *"}, "cron '60 * * * * *': second '60'"),
        ({"every_seconds": None, "cron": "0 60 * * * *"}, "minute '60'"),
        ({"every_seconds": None, "cron": "0 0 24 * * *"}, "hour '24'"),
        ({"every_seconds": None, "cron": "0 0 0 0 * *"}, "day '0'"),
        ({"every_seconds": None, "cron": "0 0 0 * 13 *"}, "month '13'"),
        ({"every_seconds": None, "cron": "0 0 0 * * 8"}, "weekday '8'"),
        ({"every_seconds": None, "cron": "0 0 * * sun#1"}, "'#' (nth weekday of the month)"),
        ({"every_seconds": None, "cron": "0 0 0 * * someday"}, "weekday 'someday'"),
        ({"every_seconds": None, "cron": "*/0 * * * * *"}, "second '*/0'"),
        ({"every_seconds": None, "cron": "0 0 0 31 2 *"},
         "cron '0 0 0 31 2 *': day '31' never occurs in month '2'"),
        ({"every_seconds": None, "cron": "0 0 0 30,31 feb *"}, "never occurs in month 'feb'"),
        ({"every_seconds": None, "cron": "0 0 31 2 *"}, "never occurs"),
        ({"every_seconds": 0}, "greater than or equal to 1"),
        ({"collection": {"directory": "relative/dir"}}, "absolute path"),
        ({"collection": {"directory": str(collection_dir), "sources": ["a/b", "c/d"]}},
         "exactly one of hub_collection, sources, directory"),
        ({"collection": {"hub_collection": "org/no-id"}}, "not a collection slug"),
        ({"destination": "out"}, "hub://org/name or an absolute local directory"),
        ({"typo": 1}, "unknown field"),
        *(({"template": body["template"] | {"method": {"name": "ties", "params": params}}},
           message) for params, message in [
            ({"alpha": float("inf")}, "finite number"),
            ({"target_rank": float("nan")}, "target_rank must be a positive integer, got nan"),
            ({"target_rank": 0}, "target_rank must be a positive integer, got 0"),
            ({"target_rank": True}, "target_rank must be a positive integer, got True")]),
    ]
    for change, message in bad:
        # json.dumps writes NaN and Infinity as JSON's parsers (Python's too) read them
        response = env.client.post("/v1/schedules", content=json.dumps(body | change),
                                   headers=env.headers() | {"Content-Type": "application/json"})
        assert response.status_code == 422, (change, response.text)
        error = response.json()["error"]
        assert error["type"] == "ScheduleError", error  # the schema's and the checks' alike
        assert any(message in p["message"] for p in error["problems"]), (change, error)

    # checked before anything is stored: the method, the Hub destination's token, local paths
    response = env.post("/v1/schedules", json=body | {
        "template": {"method": {"name": "no_such_method"}},
        "collection": {"directory": str(tmp_path / "missing")},
        "base": str(tmp_path / "no-base")})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["type"] == "ScheduleError"
    fields = {p["field"] for p in error["problems"]}
    assert {"template.method.name", "collection.directory", "base"} <= fields, error
    assert env.get("/v1/schedules").json()["schedules"] == [] or all(
        s["name"] != "api" for s in env.get("/v1/schedules").json()["schedules"])

    schedule = create(env, body)
    assert schedule["paused"] and schedule["every_seconds"] == 2 and schedule["last_run"] is None
    listed = env.get("/v1/schedules").json()["schedules"]
    assert schedule["id"] in [s["id"] for s in listed]
    assert env.get(f"/v1/schedules/{schedule['id']}").json() == schedule
    assert not env.schedules.entry_exists(schedule["id"])  # paused: no beat entry

    # pause, resume, run, delete: the creating key or an admin
    sid = schedule["id"]
    for action in ("pause", "resume", "run"):
        response = env.post(f"/v1/schedules/{sid}/{action}", "submit2")
        assert response.status_code == 403, response.text
        assert "only the key that created" in response.json()["error"]["message"]
    assert env.client.delete(f"/v1/schedules/{sid}",
                             headers=env.headers("submit2")).status_code == 403
    # while a tick of the schedule runs: run-now answers 409, a scheduled tick is recorded
    # as skipped
    token = env.schedules.acquire_tick(sid)
    assert token is not None
    busy = env.post(f"/v1/schedules/{sid}/run")
    assert busy.status_code == 409 and busy.json()["error"]["type"] == "Conflict"
    assert env.post(f"/v1/schedules/{sid}/resume", "admin").json()["paused"] is False
    assert env.schedules.entry_exists(sid)
    skipped = env.wait_runs(sid, 1, timeout=30)[0]
    assert skipped["status"] == "skipped" and "still running" in skipped["reason"]
    assert env.post(f"/v1/schedules/{sid}/pause").json()["paused"] is True
    assert not env.schedules.entry_exists(sid)
    env.schedules.release_tick(sid, token)
    run = env.post(f"/v1/schedules/{sid}/run").json()  # an empty directory: nothing to merge
    assert run["status"] == "skipped" and "0 adapter(s) to merge" in run["reason"]
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers("admin")
                             ).status_code == 204

    missing = env.get(f"/v1/schedules/{sid}")
    assert missing.status_code == 404
    assert missing.json() == {"error": {"type": "NotFound", "message": f"no schedule {sid!r}",
                                        "problems": []}}
    assert env.get(f"/v1/schedules/{sid}/runs").status_code == 404
    assert env.post(f"/v1/schedules/{sid}/run").status_code == 404

    # a cron schedule: a redbeat entry with the crontab, first due at the next match
    cron = create(env, body | {"every_seconds": None, "cron": "*/5 * * * *", "paused": False})
    from redbeat import RedBeatSchedulerEntry

    entry = RedBeatSchedulerEntry.from_key(
        RedBeatSchedulerEntry.generate_key(env.schedules.beat_app, cron["id"]),
        app=env.schedules.beat_app)
    assert entry.schedule.minute == set(range(0, 60, 5)) and entry.args == [cron["id"]]
    due, _ = entry.is_due()
    assert not due or datetime.now(UTC).minute % 5 == 0
    assert env.client.delete(f"/v1/schedules/{cron['id']}", headers=env.headers()
                             ).status_code == 204
    assert not env.schedules.entry_exists(cron["id"])

    # a 6-field cron: redbeat's rrule, as it was built, back from Redis through redbeat's decoder,
    # counted from the schedule's creation (whole seconds, UTC)
    from redbeat.schedules import rrule

    from workers.schedules.beat import TickEntry

    expression = "0 30 9 * * mon-fri"
    seconds = create(env, body | {"every_seconds": None, "cron": expression, "paused": False})
    key = RedBeatSchedulerEntry.generate_key(env.schedules.beat_app, seconds["id"])
    entry = RedBeatSchedulerEntry.from_key(key, app=env.schedules.beat_app)
    rule = entry.schedule
    assert isinstance(rule, rrule) and entry.args == [seconds["id"]]
    assert repr(rule) == repr(rule_from(cron_schedule(expression), rule.dtstart))
    assert (rule.bysecond, rule.byminute, rule.byhour, rule.byweekday) == (
        [0], [30], [9], [0, 1, 2, 3, 4])
    assert rule.bymonthday is None and rule.bymonth is None
    assert rule.dtstart.utcoffset() == timedelta(0) and rule.dtstart.microsecond == 0
    created = datetime.fromisoformat(seconds["created_at"])
    assert created - timedelta(seconds=1) <= rule.dtstart <= entry.last_run_at
    upcoming = rule.rrule.after(entry.last_run_at)
    assert upcoming.weekday() < 5 and (upcoming.hour, upcoming.minute, upcoming.second) == (
        9, 30, 0)
    assert upcoming - entry.last_run_at <= timedelta(days=3)  # a Friday's to Monday's
    # the scheduler's entry counts the same rule from the entry's last run
    ticking = TickEntry.from_key(key, app=env.schedules.beat_app)
    assert ticking.schedule.dtstart == entry.last_run_at.replace(microsecond=0)
    assert repr(ticking.schedule) == repr(rule_from(rule, entry.last_run_at))
    assert ticking.schedule.rrule.after(entry.last_run_at) == upcoming
    assert env.client.delete(f"/v1/schedules/{seconds['id']}", headers=env.headers()
                             ).status_code == 204
    assert not env.schedules.entry_exists(seconds["id"])

    paths = env.get("/openapi.json").json()["paths"]
    assert {"post", "get"} <= set(paths["/v1/schedules"])
    examples = paths["/v1/schedules"]["post"]["requestBody"]["content"]["application/json"]
    assert set(examples["examples"]) == {"hub_collection", "directory"}
    assert {"get", "delete"} <= set(paths["/v1/schedules/{schedule_id}"])
    for action in ("run", "pause", "resume"):
        assert "post" in paths[f"/v1/schedules/{{schedule_id}}/{action}"]
    assert "get" in paths["/v1/schedules/{schedule_id}/runs"]


def test_create_reports_every_schema_problem_at_once_each_with_its_field(env: Env,
                                                                        tmp_path: Path) -> None:
    body = schedule_body(env, "all-at-once", {"sources": [
        "adapters/qv", "./adapters/qv", str(env.adapters["qv"]),
        str(env.adapters["qv"]) + "/../qv", "alice/minilm-qv", "alice/minilm-qv@main"]},
        "out", every_seconds=None, cron="61 * * * *", base="./base", paused=True)
    response = env.post("/v1/schedules", json=body)
    assert response.status_code == 422, response.text
    problems = {p["field"]: p["message"] for p in response.json()["error"]["problems"]}
    assert set(problems) == {"cron", "destination", "base", "collection.sources"}, problems
    assert "cron '61 * * * *'" in problems["cron"]
    assert "absolute local directory" in problems["destination"]
    assert "base './base'" in problems["base"]
    # a relative path would be read from the directory of whichever process ticks
    assert "sources.1 './adapters/qv': neither a Hub id" in problems["collection.sources"]
    # `adapters/qv` is a Hub id, wherever a directory of that name may be
    del body["collection"]["sources"][1]
    response = env.post("/v1/schedules", json=body)
    problems = {p["field"]: p["message"] for p in response.json()["error"]["problems"]}
    assert problems["collection.sources"] == (
        f"sources.2 '{env.adapters['qv']}/../qv': the same adapter as sources.1 "
        f"'{env.adapters['qv']}'"), problems
    del body["collection"]["sources"][2]
    response = env.post("/v1/schedules", json=body)
    problems = {p["field"]: p["message"] for p in response.json()["error"]["problems"]}
    assert problems["collection.sources"] == ("sources.3 'alice/minilm-qv@main': the same "
                                              "adapter as sources.2 'alice/minilm-qv'"), problems
    assert all(s["name"] != "all-at-once" for s in env.get("/v1/schedules").json()["schedules"])


# --- 6-field cron: when it fires --------------------------------------------------------------

def next_run(expression: str, at: datetime) -> datetime:
    """When `expression` fires next after a run at `at`, the clock reading `at`."""
    schedule = cron_schedule(expression)
    if len(expression.split()) == 6:
        schedule = rule_from(schedule, at)  # built now: its runs start now, not at `at`
    schedule.nowfun = lambda: at
    return at + schedule.remaining_estimate(at)


def test_seconds_cron_fires_at_its_seconds() -> None:
    friday = datetime(2025, 6, 6, 12, 0, 7, 300000, tzinfo=UTC)
    assert next_run("*/15 * * * * *", friday) == datetime(2025, 6, 6, 12, 0, 15, tzinfo=UTC)
    assert next_run("*/15 * * * * *", friday.replace(second=45, microsecond=0)) == \
        datetime(2025, 6, 6, 12, 1, 0, tzinfo=UTC)
    assert next_run("* * * * * *", friday) == datetime(2025, 6, 6, 12, 0, 8, tzinfo=UTC)
    # weekdays: names or numbers, 0 = Sunday
    assert next_run("0 30 9 * * mon-fri", friday) == datetime(2025, 6, 9, 9, 30, tzinfo=UTC)
    assert next_run("0 30 9 * * 1-5", datetime(2025, 6, 9, 9, 29, 59, 500000, tzinfo=UTC)) \
        == datetime(2025, 6, 9, 9, 30, tzinfo=UTC)
    assert next_run("30 0 0 * * 0", friday) == datetime(2025, 6, 8, 0, 0, 30, tzinfo=UTC)
    # a restricted day and weekday both match: the next Friday the 13th
    assert next_run("0 0 0 13 * fri", friday + timedelta(days=8)) == \
        datetime(2026, 2, 13, tzinfo=UTC)
    assert next_run("0 0 0 29 2 *", friday) == datetime(2028, 2, 29, tzinfo=UTC)

    # due at 12:00:15 after a run at 12:00:07.3, then 15 s to the next
    rule = rule_from(cron_schedule("*/15 * * * * *"), friday)
    rule.nowfun = lambda: datetime(2025, 6, 6, 12, 0, 15, tzinfo=UTC)
    assert tuple(rule.is_due(friday)) == (True, 15.0)
    rule.nowfun = lambda: datetime(2025, 6, 6, 12, 0, 14, 500000, tzinfo=UTC)
    assert tuple(rule.is_due(friday)) == (False, 0.5)

    # counted from a later start, a rule has the same runs after it
    built = cron_schedule("*/15 * * * * *")
    later = built.dtstart + timedelta(hours=5, seconds=7.3)
    assert rule_from(built, later).rrule.after(later) == built.rrule.after(later)


@pytest.mark.parametrize(("five", "six"), [
    ("0 2 * * *", "0 0 2 * * *"),
    ("*/15 9-17 * * mon-fri", "0 */15 9-17 * * mon-fri"),
    ("30 6 1,15 * *", "0 30 6 1,15 * *"),
    ("0 0 13 * 5", "0 0 0 13 * 5"),
    ("5 4 * jan,jul sun", "0 5 4 * jan,jul sun"),
    ("0 12 31 * *", "0 0 12 31 * *"),
    ("0 0 29 2 *", "0 0 0 29 2 *"),
])
def test_five_and_six_field_crons_agree(five: str, six: str) -> None:
    for at in (datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 2, 28, 23, 59, 30, tzinfo=UTC),
               datetime(2025, 3, 15, 2, 0, tzinfo=UTC), datetime(2025, 6, 13, tzinfo=UTC),
               datetime(2025, 6, 6, 17, 50, 12, 345000, tzinfo=UTC),
               datetime(2027, 12, 31, 12, 0, tzinfo=UTC)):
        assert next_run(five, at) == next_run(six, at), at


@pytest.mark.parametrize(("expression", "message"), [
    ("0 2 * mon *", "month 'mon': 'mon' is not a month (jan-dec)"),  # Celery: January
    ("0 2 * * mar", "weekday 'mar': 'mar' is not a weekday (sun-sat)"),  # Celery: Wednesday
    ("0 2 * * marble", "'marble' is not a weekday"),  # Celery: its first three letters
    ("mon 2 * * *", "minute 'mon': names are allowed only in the month"),  # Celery: minute 1
    ("0 0 2 tue * *", "day 'tue': names are allowed only in the month"),
])
def test_cron_names_only_in_their_own_fields(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        cron_schedule(expression)


def test_local_roots_confine_a_schedule_s_paths(redis_server: EmbeddedRedis,
                                               minilm_dir: Path,
                                               minilm_adapters: dict[str, Path],
                                               tmp_path: Path) -> None:
    """With MERGE_SERVICE_LOCAL_ROOTS, a schedule's base, collection and destination must lie
    under them (links followed), checked at creation; each run's job is checked again when it
    is submitted, as every job sent to the API is."""
    url = redis_url(redis_server, 15)
    JobStore.from_url(url).r.flushdb()
    allowed = tmp_path / "allowed"
    (allowed / "adapters").mkdir(parents=True)
    (allowed / "escape").symlink_to(tmp_path)
    for name in ("qv", "pattern"):
        shutil.copytree(minilm_adapters[name], allowed / "adapters" / name)
    # an adapter of the collection that is a link to a directory outside the roots
    (allowed / "adapters" / "linked").symlink_to(minilm_adapters["rslora"])
    (allowed / "adapters" / "tmp").symlink_to(tmp_path)  # no adapter, and not looked into
    app = create_app(service_settings(url, tmp_path / "data", api_keys=API_KEYS,
                                      local_roots=f"{allowed},{minilm_dir}"))
    headers = {"Authorization": f"Bearer {KEYS['submit']}"}
    body = {"name": "confined", "base": str(minilm_dir), "every_seconds": 3600, "paused": True,
            "collection": {"directory": str(allowed / "adapters")},
            "template": {"method": {"name": "task_arithmetic"}, "output": {"format": "lora"}},
            "destination": str(allowed / "out")}
    with TestClient(app, base_url="http://127.0.0.1") as client:
        created = client.post("/v1/schedules", json=body, headers=headers)
        assert created.status_code == 201, created.text
        # a run submits its job through the API's own checks: the link is left out
        run = client.post(f"/v1/schedules/{created.json()['id']}/run", headers=headers).json()
        assert run["status"] == "submitted", [o["problems"] for o in run["left_out"]]
        assert sorted(run["merged"]) == ["pattern", "qv"] and run["left_out"] == []
        # not read, not copied: the links lead out of the roots
        ignored = {i["origin"]: i["reason"] for i in run["ignored"]}
        assert set(ignored) == {str(minilm_adapters["rslora"].resolve()),
                                str(tmp_path.resolve())}
        assert all("outside the directories" in reason for reason in ignored.values())
        job = client.get(f"/v1/jobs/{run['job_id']}", headers=headers).json()
        # the job reads the schedule's own copies of the adapters, under DATA_DIR
        assert all(m["source"].startswith(str((tmp_path / "data").resolve()))
                   for m in job["spec"]["models"])

        outside = {"collection": {"directory": str(allowed / "escape")},
                   "destination": str(tmp_path / "out"),
                   "base": str(tmp_path / "not-a-base")}
        response = client.post("/v1/schedules", json=body | outside, headers=headers)
        assert response.status_code == 422
        problems = response.json()["error"]["problems"]
        # outside: refused, not looked at (no "is not a directory" for the missing base)
        assert sorted(p["field"] for p in problems) == ["base", "collection.directory",
                                                        "destination"]
        assert all("outside the directories" in p["message"] for p in problems)
        sources = {"collection": {"sources": [str(allowed / "adapters"), "/etc"]}}
        response = client.post("/v1/schedules", json=body | sources, headers=headers)
        assert [p["field"] for p in response.json()["error"]["problems"]] == \
            ["collection.sources.1"]


@pytest.mark.parametrize(("expression", "message"), [
    ("0 2 * * sun#1", "weekday 'sun#1': '#' (nth weekday of the month) is not supported"),
    ("0 2 * * 0#1", "weekday '0#1': '#' (nth weekday of the month) is not supported"),
    ("0 0 2 * * mon#2", "weekday 'mon#2': '#'"),
    ("0 2 L * *", "day 'L': 'L' (last day or weekday of the month) is not supported"),
    ("0 2 * * 5L", "weekday '5L': 'L'"),
    ("0 2 15W * *", "day '15W': 'W' (nearest weekday) is not supported"),
    ("0 2 LW * *", "day 'LW': 'LW' (last weekday of the month)"),
    ("0 2 ? * mon", "day '?': '?' (no specific value) is not supported"),
    ("0 0 2 * * ?", "weekday '?': '?'"),
    ("0 2 * * 8", "weekday '8'"),
    ("0 0 2 * * 0-8", "weekday '0-8'"),
])
def test_cron_extensions_refused_by_name(expression: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        cron_schedule(expression)


def test_cron_seven_is_sunday() -> None:
    friday = datetime(2025, 6, 6, 12, tzinfo=UTC)
    sunday = datetime(2025, 6, 8, tzinfo=UTC)
    for fields in ("0 0 * * {}", "0 0 0 * * {}"):
        assert next_run(fields.format(7), friday) == next_run(fields.format(0), friday) == \
            sunday
        assert next_run(fields.format("1-7"), friday) == next_run(fields.format("*"), friday)
        assert next_run(fields.format("6-7"), friday) == datetime(2025, 6, 7, tzinfo=UTC)
        assert next_run(fields.format("1-7/2"), friday) == next_run(fields.format("0,1,3,5"),
                                                                    friday) == sunday
    assert cron_schedule("0 0 * * 7").day_of_week == {0}
    assert list(cron_schedule("0 0 0 * * 7").byweekday) == [6]  # dateutil counts from Monday


def test_cron_names_any_case_abbreviated_or_whole() -> None:
    at = datetime(2025, 6, 6, 12, tzinfo=UTC)  # a Friday
    assert next_run("0 9 * * Monday", at) == next_run("0 9 * * 1", at) == \
        datetime(2025, 6, 9, 9, tzinfo=UTC)
    assert next_run("0 0 1 JAN,july *", at) == datetime(2025, 7, 1, tzinfo=UTC)
    assert next_run("0 0 0 1 Jan-Mar *", at) == datetime(2026, 1, 1, tzinfo=UTC)


# --- ticks of the scheduler process ----------------------------------------------------------

def test_directory_schedule_runs_skips_when_unchanged_and_follows_changes(
        env: Env, tmp_path: Path) -> None:
    collection = tmp_path / "adapters"
    collection.mkdir()
    copy_adapter(env.adapters["qv"], collection / "qv")
    copy_adapter(env.adapters["pattern"], collection / "pattern")
    (collection / "notes.txt").write_text("not an adapter")
    out = tmp_path / "out"
    schedule = create(env, schedule_body(env, "nightly-dir", {"directory": str(collection)},
                                         str(out)))
    sid = schedule["id"]

    # the first tick, one period after creation: a job pinned to the adapters' content hashes
    first = env.wait_runs(sid, 1)[-1]
    assert first["status"] == "submitted" and first["trigger"] == "schedule", first
    assert sorted(first["merged"]) == ["pattern", "qv"]
    pinned = by_name(first["adapters"])
    for name in ("qv", "pattern"):
        assert pinned[name]["revision"] == content_hash(collection / name)
        assert pinned[name]["origin"] == str(collection / name)
        snapshot = Path(pinned[name]["source"])
        assert pinned[name]["revision"] in snapshot.parts and content_hash(snapshot) == \
            pinned[name]["revision"]
    assert [i["origin"] for i in first["ignored"]] == [str(collection / "notes.txt")]
    job = env.wait_job(first["job_id"])
    assert job.status == "succeeded", job.error
    assert job.schedule_id == sid and job.name == "nightly-dir"
    assert job.result is not None and job.result.destination == str(out / first["id"])
    merged_spec = yaml.safe_load((out / first["id"] / "merge_spec.yaml").read_text())
    assert sorted(m["source"] for m in merged_spec["models"]) == sorted(
        pinned[n]["source"] for n in ("qv", "pattern"))
    assert (out / first["id"] / "adapter_model.safetensors").is_file()

    # nothing changed: the next ticks are recorded as skipped, with the reason
    def skipped_after_success() -> dict | None:
        runs = env.runs(sid)
        return next((r for r in runs if r["status"] == "skipped"
                     and "unchanged since the last successful run" in r["reason"]), None)

    skip = wait_for(skipped_after_success, timeout=60, interval=0.3, what="a skipped run")
    assert first["id"] in skip["reason"] and first["job_id"] in skip["reason"]
    assert skip["fingerprint"] == first["fingerprint"] and skip["job_id"] is None
    assert [r["job_id"] for r in env.runs(sid) if r["job_id"]] == [first["job_id"]]

    # an adapter added: a new job with three
    copy_adapter(env.adapters["rslora"], collection / "rslora")
    added = wait_for(lambda: next((r for r in env.runs(sid) if r["status"] == "submitted"
                                   and len(r["merged"]) == 3), None),
                     timeout=60, interval=0.3, what="a run with the added adapter")
    assert added["fingerprint"] != first["fingerprint"]
    assert env.wait_job(added["job_id"]).status == "succeeded"

    # an adapter updated: a new job, the updated one at a new revision, the others as before
    retrain(collection / "pattern", 2.0)
    updated = wait_for(lambda: next((r for r in env.runs(sid) if r["status"] == "submitted"
                                     and r["id"] > added["id"]), None),
                       timeout=60, interval=0.3, what="a run with the updated adapter")
    before, after = by_name(added["adapters"]), by_name(updated["adapters"])
    assert after["pattern"]["revision"] != before["pattern"]["revision"]
    assert after["pattern"]["revision"] == content_hash(collection / "pattern")
    assert {n: after[n]["revision"] for n in ("qv", "rslora")} == \
        {n: before[n]["revision"] for n in ("qv", "rslora")}
    assert env.wait_job(updated["job_id"]).status == "succeeded"
    # each run wrote its own directory
    assert {p.name for p in out.iterdir()} >= {first["id"], added["id"], updated["id"]}
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204


def test_pause_resume_run_now_and_delete(env: Env, tmp_path: Path) -> None:
    collection = tmp_path / "adapters"
    collection.mkdir()
    copy_adapter(env.adapters["qv"], collection / "qv")
    copy_adapter(env.adapters["pattern"], collection / "pattern")
    schedule = create(env, schedule_body(env, "pausable", {"directory": str(collection)},
                                         str(tmp_path / "out"), every_seconds=None,
                                         cron="* * * * * *"))
    sid = schedule["id"]
    first = env.wait_runs(sid, 1)[-1]
    assert env.wait_job(first["job_id"]).status == "succeeded"
    env.wait_runs(sid, 2)

    # paused: no tick at all
    assert env.post(f"/v1/schedules/{sid}/pause").json()["paused"] is True
    time.sleep(1.5)  # a tick fired just before the pause may still be recorded
    count = len(env.runs(sid))
    time.sleep(4)
    assert len(env.runs(sid)) == count
    got = env.get(f"/v1/schedules/{sid}").json()
    assert got["paused"] is True and got["last_run"]["id"] == env.runs(sid)[0]["id"]

    # run now works on a paused schedule: a tick in the API process, recorded as manual
    now = env.post(f"/v1/schedules/{sid}/run")
    assert now.status_code == 200, now.text
    run = now.json()
    assert run["trigger"] == "manual" and run["status"] == "skipped"
    assert "unchanged" in run["reason"]
    forced = env.post(f"/v1/schedules/{sid}/run", params={"force": "true"}).json()
    assert forced["status"] == "submitted" and forced["job_status"] in {
        "queued", "validating", "running", "pushing", "succeeded"}
    assert env.runs(sid)[0]["id"] == forced["id"]
    assert env.wait_job(forced["job_id"]).status == "succeeded"
    assert len(env.runs(sid)) == count + 2

    # resumed: ticks again
    assert env.post(f"/v1/schedules/{sid}/resume").json()["paused"] is False
    resumed = env.wait_runs(sid, count + 3, timeout=30)[0]
    assert resumed["trigger"] == "schedule" and resumed["status"] == "skipped"

    # deleted: gone, with its history and its beat entry; no tick records anything again
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204
    assert env.get(f"/v1/schedules/{sid}").status_code == 404
    assert not env.schedules.entry_exists(sid)
    time.sleep(3)
    assert env.store.r.llen(f"ms:schedule:{sid}:runs") == 0
    assert env.store.r.exists(f"ms:schedule:{sid}") == 0


def test_adapters_failing_preflight_are_left_out_and_listed(env: Env, tmp_path: Path) -> None:
    collection = tmp_path / "adapters"
    collection.mkdir()
    copy_adapter(env.adapters["qv"], collection / "qv")
    copy_adapter(env.adapters["pattern"], collection / "pattern")
    copy_adapter(env.adapters["rslora"], collection / "other-base",
                 base_model_name_or_path="other-org/other-base")
    copy_adapter(env.adapters["qv"], collection / "dora", use_dora=True)
    schedule = create(env, schedule_body(env, "mixed", {"directory": str(collection)},
                                         str(tmp_path / "out"), paused=True))
    sid = schedule["id"]

    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "submitted", run
    assert sorted(run["merged"]) == ["pattern", "qv"]
    assert sorted(a["name"] for a in run["adapters"]) == ["dora", "other-base", "pattern", "qv"]
    left_out = by_name(run["left_out"])
    assert set(left_out) == {"dora", "other-base"}
    assert any("trained on 'other-org/other-base'" in p["message"]
               for p in left_out["other-base"]["problems"])
    assert any("DoRA" in p["message"] for p in left_out["dora"]["problems"])
    assert left_out["dora"]["revision"] == content_hash(collection / "dora")
    assert not any(o["transient"] for o in run["left_out"])  # for what they are
    job = env.wait_job(run["job_id"])
    assert job.status == "succeeded", job.error
    assert sorted(m.name for m in job.spec.models) == ["pattern", "qv"]
    # left out for what they are at their revisions: the same set is unchanged, not retried
    again = env.post(f"/v1/schedules/{sid}/run").json()
    assert again["status"] == "skipped" and "unchanged" in again["reason"], again
    # a new revision of one of them is a change
    config = collection / "dora" / "adapter_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"use_dora": False}))
    fixed = env.post(f"/v1/schedules/{sid}/run").json()
    assert fixed["status"] == "submitted" and sorted(fixed["merged"]) == [
        "dora", "pattern", "qv"], fixed
    assert env.wait_job(fixed["job_id"]).status == "succeeded"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"use_dora": True}))

    # fewer than two left: skipped with the reason, no job
    shutil.rmtree(collection / "pattern")
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "skipped" and run["job_id"] is None
    assert "1 adapter(s) to merge (2 left out); a merge needs at least 2" in run["reason"]
    assert set(by_name(run["left_out"])) == {"dora", "other-base"}

    # a problem that is no one adapter's (a template that selects no tensor of the base):
    # the run failed, every problem listed, nothing queued
    copy_adapter(env.adapters["pattern"], collection / "pattern")
    response = env.client.delete(f"/v1/schedules/{sid}", headers=env.headers())
    assert response.status_code == 204
    broken = create(env, schedule_body(env, "broken", {"directory": str(collection)},
                                       str(tmp_path / "out"), paused=True,
                                       template={"method": {"name": "task_arithmetic"},
                                                 "output": {"format": "lora"},
                                                 "options": {"include": ["no_such_tensor"]}}))
    queued = env.store.counts()["queued"]
    run = env.post(f"/v1/schedules/{broken['id']}/run").json()
    assert run["status"] == "failed" and run["job_id"] is None
    assert any(p["field"] == "options.include" for p in run["problems"]), run
    assert set(by_name(run["left_out"])) == {"dora", "other-base"}
    assert env.store.counts()["queued"] == queued


def test_two_schedulers_fire_once_per_tick(env: Env, tmp_path: Path) -> None:
    collection = tmp_path / "adapters"
    collection.mkdir()
    copy_adapter(env.adapters["qv"], collection / "qv")  # one adapter: every tick skips, fast
    env.start_scheduler("scheduler-2")
    schedule = create(env, schedule_body(env, "contended", {"directory": str(collection)},
                                         str(tmp_path / "out"), every_seconds=1))
    sid = schedule["id"]
    started = time.monotonic()
    env.wait_runs(sid, 6, timeout=60)
    elapsed = time.monotonic() - started
    runs = env.runs(sid)
    assert all(r["status"] == "skipped" and "1 adapter(s)" in r["reason"] for r in runs)
    # one run per tick: never more runs than ticks in the time, never two at once
    assert len(runs) <= elapsed / 1.0 + 2, (len(runs), elapsed)
    starts = sorted(_seconds(r["started_at"]) for r in runs)
    assert min(b - a for a, b in itertools.pairwise(starts)) > 0.25, starts

    # one holds the lock and fires every tick; the other waits for the lock and fires none
    def fired(process: Process) -> int:
        return process.output().count(f"Sending due task {sid}")

    holders = [p for p in env.schedulers if p.alive() and "Acquired lock" in p.output()]
    assert len(holders) == 1, [p.output()[-2000:] for p in env.schedulers]
    holder = holders[0]
    waiting = next(p for p in env.schedulers if p.alive() and p is not holder)
    assert fired(waiting) == 0 and fired(holder) >= len(runs)
    assert "was fired already" not in holder.output() + waiting.output()

    # the holder crashes (a clean stop releases the lock at once: see the `up` test): the
    # other takes over when the lock expires, and the ticks go on, still one at a time
    holder.kill(signal.SIGKILL)
    holder.process.wait(20)  # type: ignore[union-attr]
    env.schedulers.remove(holder)
    count = len(env.runs(sid))
    wait_for(lambda: "Acquired lock" in waiting.output(), timeout=BEAT_LOCK_TIMEOUT_S + 30,
             what="the takeover")
    env.wait_runs(sid, count + 3, timeout=30)
    runs = env.runs(sid)
    starts = sorted(_seconds(r["started_at"]) for r in runs)
    assert min(b - a for a, b in itertools.pairwise(starts)) > 0.25, starts
    assert fired(waiting) >= len(runs) - count
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204


def _seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


# --- a Hub collection ------------------------------------------------------------------------

def adapter_files(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes()
            for name in ("adapter_config.json", "adapter_model.safetensors")}


def test_hub_collection_pinned_to_shas_and_pushed_with_them(env: Env, tmp_path: Path) -> None:
    hub = env.hub
    qv = hub.add_repo("alice/minilm-qv", adapter_files(env.adapters["qv"]))
    pattern = hub.add_repo("bob/minilm-pattern", adapter_files(env.adapters["pattern"]))
    wrong = copy_adapter(env.adapters["rslora"], tmp_path / "wrong",
                         base_model_name_or_path="other-org/other-base")
    hub.add_repo("carol/minilm-other-base", adapter_files(wrong))
    hub.add_repo("dave/a-full-model", {"config.json": b"{}", "model.safetensors": b"x" * 64})
    slug = hub.add_collection("alice", "MiniLM adapters", [
        "alice/minilm-qv", "bob/minilm-pattern", "carol/minilm-other-base",
        "dave/a-full-model"])
    hub.add_collection_item(slug, "some/dataset", item_type="dataset")
    schedule = create(env, schedule_body(env, "hub-nightly", {"hub_collection": slug},
                                         f"hub://{HF_USER}/minilm-merged", paused=True))
    sid = schedule["id"]

    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "submitted", run
    pinned = by_name(run["adapters"])
    assert pinned["minilm-qv"]["source"] == f"alice/minilm-qv@{qv}"
    assert pinned["minilm-pattern"]["source"] == f"bob/minilm-pattern@{pattern}"
    assert sorted(run["merged"]) == ["minilm-pattern", "minilm-qv"]
    assert [a["origin"] for a in run["left_out"]] == ["carol/minilm-other-base"]
    ignored = {i["origin"]: i["reason"] for i in run["ignored"]}
    assert "no adapter_config.json" in ignored["dave/a-full-model"]
    assert "dataset" in ignored["some/dataset"]
    job = env.wait_job(run["job_id"])
    assert job.status == "succeeded", job.error
    assert job.result is not None and job.result.revision is not None
    head = hub.repo(f"{HF_USER}/minilm-merged").commits[job.result.revision]
    assert f"alice/minilm-qv@{qv}" in head.message
    assert f"bob/minilm-pattern@{pattern}" in head.message
    assert "hub-nightly" in head.message.splitlines()[0]

    # unchanged: skipped without a job (and without downloading anything)
    hub.clear_requests()
    again = env.post(f"/v1/schedules/{sid}/run").json()
    assert again["status"] == "skipped" and "unchanged" in again["reason"]
    assert hub.downloaded() == []

    # an adapter updated on the Hub: a new job at the new sha, a new commit naming it
    retrained = copy_adapter(env.adapters["pattern"], tmp_path / "pattern-v2")
    retrain(retrained, 3.0)
    pattern2 = hub.add_commit("bob/minilm-pattern", adapter_files(retrained),
                              message="retrained")
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "submitted", run
    assert by_name(run["adapters"])["minilm-pattern"]["revision"] == pattern2
    job = env.wait_job(run["job_id"])
    assert job.status == "succeeded", job.error
    head = hub.repo(f"{HF_USER}/minilm-merged").commits[job.result.revision]  # type: ignore[union-attr]
    assert f"bob/minilm-pattern@{pattern2}" in head.message
    assert head.parent is not None  # a new commit on top of the previous run's

    # an adapter added to the collection: a new job with three
    hub.add_repo("erin/minilm-rslora", adapter_files(env.adapters["rslora"]))
    hub.add_collection_item(slug, "erin/minilm-rslora")
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "submitted", run
    assert sorted(run["merged"]) == ["minilm-pattern", "minilm-qv", "minilm-rslora"]
    assert env.wait_job(run["job_id"]).status == "succeeded"

    # a collection that does not exist: the run failed, with the reason
    missing = create(env, schedule_body(env, "missing", {
        "hub_collection": "alice/nothing-" + "0" * 24}, str(tmp_path / "out"), paused=True))
    run = env.post(f"/v1/schedules/{missing['id']}/run").json()
    assert run["status"] == "failed" and "cannot read Hub collection" in run["reason"]


def test_a_schedule_reads_and_pushes_with_its_own_token_secret(env: Env) -> None:
    """`hf_token_secret`: the runs of the schedule read and push with the token in that
    secret (private adapters only it can see, a namespace only it may write to), and the
    schedule and its jobs hold the secret's name, never the token."""
    hub = env.hub
    token = f"hf_customer_{secrets.token_hex(8)}"
    hub.add_token(token, "customer")
    secret = env.root / "secrets" / "customer-hub"
    secret.write_text(token + "\n")
    for name in ("qv", "pattern"):
        hub.add_repo(f"customer/minilm-{name}", adapter_files(env.adapters[name]),
                     private=True, readers=[token])
    body = schedule_body(env, "customer", {"sources": ["customer/minilm-qv",
                                                       "customer/minilm-pattern"]},
                         "hub://customer/minilm-merged", paused=True)

    # the service's token may not write under `customer`: refused at creation
    response = env.post("/v1/schedules", json=body)
    assert response.status_code == 422, response.text
    [problem] = response.json()["error"]["problems"]
    assert problem["field"] == "destination"
    assert "(user merger) cannot create or change repos under 'customer'" in problem["message"]
    # where it may write, it still cannot see the adapters: nothing is merged
    hub.grant_write(HF_TOKEN, "customer")
    plain = create(env, body)
    run = env.post(f"/v1/schedules/{plain['id']}/run").json()
    assert run["status"] == "skipped" and run["job_id"] is None, run

    schedule = create(env, body | {"name": "customer-own", "hf_token_secret": "customer-hub"})
    assert schedule["hf_token_secret"] == "customer-hub"
    run = env.post(f"/v1/schedules/{schedule['id']}/run").json()
    assert run["status"] == "submitted", run
    job = env.wait_job(run["job_id"])
    assert job.status == "succeeded", job.error
    assert job.result is not None and job.result.revision is not None
    assert job.result.revision in hub.repo("customer/minilm-merged").commits
    stored = json.dumps([env.store.r.hgetall(env.store.job_key(job.id)),
                         env.get(f"/v1/schedules/{schedule['id']}").json()])
    assert token not in stored and "customer-hub" in stored
    # a retry of the job runs with the schedule's token as well
    retried = env.post(f"/v1/jobs/{job.id}/retry").json()
    assert env.store.internal(retried["id"])["hub_secret"] == "customer-hub"
    assert env.wait_job(retried["id"]).status == "succeeded"

    # a secret that cannot be read: refused at creation, a failed run once it is gone
    for name, message in (("missing", "cannot read the Hub token secret 'missing'"),
                          ("../secrets/customer-hub", "should match pattern")):
        response = env.post("/v1/schedules", json=body | {"hf_token_secret": name})
        assert response.status_code == 422, response.text
        assert message in response.text
    secret.unlink()
    run = env.post(f"/v1/schedules/{schedule['id']}/run").json()
    assert run["status"] == "failed" and "cannot read the Hub token secret" in run["reason"]


def test_a_hub_base_is_pinned_and_a_new_commit_on_it_is_a_change(env: Env, tmp_path: Path
                                                                  ) -> None:
    hub = env.hub
    v1 = hub.add_repo("acme/minilm-base", {p.name: p.read_bytes() for p in env.base.iterdir()
                                            if p.is_file()})
    adapters = [str(copy_adapter(env.adapters[name], tmp_path / name,
                                 base_model_name_or_path="acme/minilm-base"))
                for name in ("qv", "pattern")]
    schedule = create(env, schedule_body(env, "hub-base", {"sources": adapters},
                                         str(tmp_path / "out"), paused=True,
                                         base="acme/minilm-base"))
    sid = schedule["id"]
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "submitted", run
    assert run["base"] == f"acme/minilm-base@{v1}"
    job = env.wait_job(run["job_id"])
    assert job.status == "succeeded", job.error
    assert job.spec.base == f"acme/minilm-base@{v1}"  # the commit the tick compared

    again = env.post(f"/v1/schedules/{sid}/run").json()
    assert again["status"] == "skipped" and "unchanged" in again["reason"], again

    # a new commit on the base, adapters unchanged: a new job, onto that commit
    v2 = hub.add_commit("acme/minilm-base", {"README.md": b"# MiniLM, new card\n"})
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "submitted", run
    assert run["base"] == f"acme/minilm-base@{v2}" and run["fingerprint"] != again["fingerprint"]
    job = env.wait_job(run["job_id"])
    assert job.status == "succeeded", job.error
    assert job.spec.base == f"acme/minilm-base@{v2}"

    # the Hub cannot say which commit the base is at: the run failed, with the reason
    hub.fail_next("_model_info", json_response({"error": "Repository Not Found"}, 404,
                                               {"X-Error-Code": "RepoNotFound"}))
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "failed" and run["job_id"] is None, run
    assert run["reason"].startswith("cannot read the base model acme/minilm-base"), run


def test_explicit_sources_pinned_hub_revisions_and_local_hashes(env: Env, tmp_path: Path
                                                                ) -> None:
    hub = env.hub
    v1 = hub.add_repo("frank/minilm-qv", adapter_files(env.adapters["qv"]))
    hub.create_tag("frank/minilm-qv", "v1", v1)
    pattern = hub.add_repo("frank/minilm-pattern", adapter_files(env.adapters["pattern"]))
    local = copy_adapter(env.adapters["rslora"], tmp_path / "rslora")
    schedule = create(env, schedule_body(env, "sources", {"sources": [
        "frank/minilm-qv@v1", "frank/minilm-pattern", str(local)]}, str(tmp_path / "out"),
        paused=True))
    sid = schedule["id"]
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "submitted", run
    pinned = by_name(run["adapters"])
    assert pinned["minilm-qv"]["source"] == f"frank/minilm-qv@{v1}"
    assert pinned["minilm-pattern"]["source"] == f"frank/minilm-pattern@{pattern}"
    assert pinned["rslora"]["revision"] == content_hash(local)
    assert env.wait_job(run["job_id"]).status == "succeeded"

    # a new commit on main does not move the tag: unchanged
    retrained = copy_adapter(env.adapters["qv"], tmp_path / "qv-v2")
    retrain(retrained, 2.0)
    hub.add_commit("frank/minilm-qv", adapter_files(retrained))
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "skipped" and "unchanged" in run["reason"]
    # the local adapter changed: a new job
    retrain(local, 0.5)
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "submitted"
    assert by_name(run["adapters"])["rslora"]["revision"] == content_hash(local)
    assert env.wait_job(run["job_id"]).status == "succeeded"


# --- content hashes and snapshots of local adapters -----------------------------------------

def test_content_hash_and_snapshot(tmp_path: Path, minilm_adapters: dict[str, Path]) -> None:
    from workers.schedules.collections import snapshot

    adapter = copy_adapter(minilm_adapters["qv"], tmp_path / "qv")
    first = content_hash(adapter)
    assert first == content_hash(copy_adapter(adapter, tmp_path / "elsewhere" / "qv"))
    (adapter / ".adapter_config.json.swp").write_bytes(b"editor")  # hidden: not the adapter's
    assert content_hash(adapter) == first
    # what a merge does not read of an adapter: its model card, what a trainer left beside it
    (adapter / "README.md").write_text("an edited model card")
    (adapter / "training_args.bin").write_bytes(b"args")
    (adapter / "checkpoint-500").mkdir()
    (adapter / "checkpoint-500" / "optimizer.pt").write_bytes(b"state")
    assert content_hash(adapter) == first
    config = adapter / "adapter_config.json"
    config.write_text(config.read_text() + " ")
    second = content_hash(adapter)
    assert second != first
    retrain(adapter, 2.0)
    assert content_hash(adapter) not in {first, second}
    config.write_text(config.read_text().rstrip())
    assert content_hash(adapter) != first
    shutil.copy(tmp_path / "elsewhere" / "qv" / "adapter_model.safetensors", adapter)
    assert content_hash(adapter) == first
    config.write_text(config.read_text() + " ")

    # a directory that is no adapter (a full checkpoint among `sources`): every file counts
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    whole = content_hash(checkpoint)
    (checkpoint / "extra").mkdir()
    (checkpoint / "extra" / "notes.md").write_text("x")
    assert content_hash(checkpoint) != whole

    snapshots = tmp_path / "snapshots"
    copy = snapshot(adapter, second, snapshots)
    assert copy == snapshots / second / "qv" and content_hash(copy) == second
    assert sorted(p.name for p in copy.iterdir()) == ["adapter_config.json",
                                                       "adapter_model.safetensors"]
    copied = snapshot(checkpoint, content_hash(checkpoint), snapshots)
    assert (copied / "extra" / "notes.md").read_text() == "x"
    assert snapshot(adapter, second, snapshots) == copy  # made once
    # a directory that changed since it was hashed is not stored under the old hash
    with pytest.raises(OSError, match="changed while it was being read"):
        snapshot(adapter, first, snapshots)
    assert not (snapshots / first).exists() or not any((snapshots / first).iterdir())

    # a snapshot no tick used for the keeping time is removed; one in use is kept
    import os

    from workers.schedules.collections import prune_snapshots

    old = snapshot(copy_adapter(minilm_adapters["pattern"], tmp_path / "pattern"),
                   content_hash(tmp_path / "pattern"), snapshots)
    week_ago = time.time() - 8 * 86400
    for path in (old.parent, copy.parent):
        os.utime(path, (week_ago, week_ago))
    assert snapshot(adapter, second, snapshots) == copy  # used again: its clock restarts
    assert prune_snapshots(snapshots, 7 * 86400) == [old.parent]
    assert not old.parent.exists() and content_hash(copy) == second


def test_what_a_merge_does_not_read_of_an_adapter_is_no_change(env: Env, tmp_path: Path
                                                              ) -> None:
    collection = tmp_path / "adapters"
    collection.mkdir()
    copy_adapter(env.adapters["qv"], collection / "qv")
    copy_adapter(env.adapters["pattern"], collection / "pattern")
    schedule = create(env, schedule_body(env, "cards", {"directory": str(collection)},
                                         str(tmp_path / "out"), paused=True))
    sid = schedule["id"]
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "submitted", run
    assert env.wait_job(run["job_id"]).status == "succeeded"

    # a training run writes checkpoints beside the adapter; the model card is edited
    (collection / "qv" / "README.md").write_text("an edited model card")
    (collection / "pattern" / "checkpoint-500").mkdir()
    (collection / "pattern" / "checkpoint-500" / "optimizer.pt").write_bytes(b"state" * 1000)
    again = env.post(f"/v1/schedules/{sid}/run").json()
    assert again["status"] == "skipped" and "unchanged" in again["reason"], again
    assert again["fingerprint"] == run["fingerprint"]
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204


# --- `merge-service up` ----------------------------------------------------------------------

def test_up_runs_the_scheduler(tmp_path: Path, minilm_dir: Path,
                               minilm_adapters: dict[str, Path]) -> None:
    import os

    import httpx

    from tests.service.test_up import interrupt, start_up
    from workers.redis_server import free_port

    data_dir = tmp_path / "data"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MERGE_SERVICE_")}
    environment |= {"MERGE_SERVICE_DATA_DIR": str(data_dir), "HF_HUB_OFFLINE": "1",
                    "PYTHONUNBUFFERED": "1"}
    collection = tmp_path / "adapters"
    collection.mkdir()
    copy_adapter(minilm_adapters["qv"], collection / "qv")
    up, url = start_up(environment, free_port(), tmp_path / "up.log")
    try:
        assert "scheduler: log in" in up.output()
        body = {"name": "via-up", "every_seconds": 1, "base": str(minilm_dir),
                "collection": {"directory": str(collection)},
                "template": {"method": {"name": "task_arithmetic"}},
                "destination": str(tmp_path / "out")}
        created = httpx.post(f"{url}/v1/schedules", json=body, timeout=30)
        assert created.status_code == 201, created.text
        sid = created.json()["id"]

        def scheduled_run() -> dict | None:
            runs = httpx.get(f"{url}/v1/schedules/{sid}/runs", timeout=30).json()["runs"]
            return next((r for r in runs if r["trigger"] == "schedule"), None)

        run = wait_for(scheduled_run, timeout=90, interval=0.3, what="a tick from up's scheduler")
        assert run["status"] == "skipped" and "1 adapter(s)" in run["reason"]
        assert interrupt(up) == 0
        log = (data_dir / "logs" / "scheduler.log").read_text()
        assert "Acquired lock" in log and "Releasing lock" in log
    finally:
        up.stop()


# --- one job at a time, retries, deletes during a tick, the tick lock, pause races -----------

def gpu_template() -> dict[str, Any]:
    """Jobs that wait in the `gpu` queue, which no worker of these tests consumes: open for
    as long as a test needs (the preflight runs on the CPU, as for every job)."""
    return {"method": {"name": "task_arithmetic"}, "output": {"format": "lora"},
            "options": {"device": "cuda"}}


def cancel(env: Env, job_id: str) -> None:
    response = env.post(f"/v1/jobs/{job_id}/cancel", "admin")
    assert response.status_code in (200, 202), response.text
    assert env.wait_job(job_id).status == "cancelled"


def test_a_tick_waits_for_the_open_job_of_its_schedule(env: Env, tmp_path: Path) -> None:
    collection = tmp_path / "adapters"
    collection.mkdir()
    copy_adapter(env.adapters["qv"], collection / "qv")
    copy_adapter(env.adapters["pattern"], collection / "pattern")
    schedule = create(env, schedule_body(env, "one-at-a-time", {"directory": str(collection)},
                                         str(tmp_path / "out"), paused=True,
                                         template=gpu_template()))
    sid = schedule["id"]
    first = env.post(f"/v1/schedules/{sid}/run").json()
    assert first["status"] == "submitted" and first["job_status"] == "queued", first

    # the collection changed while the job is open: no second job to the same destination
    copy_adapter(env.adapters["rslora"], collection / "rslora")
    waiting = env.post(f"/v1/schedules/{sid}/run").json()
    assert waiting["status"] == "skipped" and waiting["job_id"] is None, waiting
    assert waiting["reason"] == (f"job {first['job_id']} is still queued; the change is "
                                 "merged after it ends")
    assert waiting["fingerprint"] != first["fingerprint"]
    # asked for: a manual run with force submits alongside
    forced = env.post(f"/v1/schedules/{sid}/run", params={"force": "true"}).json()
    assert forced["status"] == "submitted" and len(forced["merged"]) == 3, forced

    # both ended: the change is merged
    cancel(env, first["job_id"])
    cancel(env, forced["job_id"])
    after = env.post(f"/v1/schedules/{sid}/run").json()
    assert after["status"] == "submitted" and sorted(after["merged"]) == [
        "pattern", "qv", "rslora"], after

    # a retry of the schedule's job is one of its open jobs: the next tick waits for it
    cancel(env, after["job_id"])
    retried = env.post(f"/v1/jobs/{after['job_id']}/retry")
    assert retried.status_code == 202, retried.text
    retry = retried.json()
    assert retry["schedule_id"] == sid and retry["status"] == "queued"
    skipped = env.post(f"/v1/schedules/{sid}/run").json()
    assert skipped["status"] == "skipped", skipped
    assert skipped["reason"] == f"job {retry['id']} for the same set is still queued"
    cancel(env, retry["id"])
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204


def test_a_retried_job_success_is_its_runs(env: Env, tmp_path: Path) -> None:
    collection = tmp_path / "adapters"
    collection.mkdir()
    copy_adapter(env.adapters["qv"], collection / "qv")
    copy_adapter(env.adapters["pattern"], collection / "pattern")
    schedule = create(env, schedule_body(env, "retried", {"directory": str(collection)},
                                         f"hub://{HF_USER}/minilm-retried", paused=True))
    sid = schedule["id"]
    env.hub.fail_next("_commit_files", hub_error(403, None, "pushes are off for a while"))
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "submitted", run
    failed = env.wait_job(run["job_id"])
    assert failed.status == "failed", failed

    retried = env.post(f"/v1/jobs/{run['job_id']}/retry")
    assert retried.status_code == 202, retried.text
    job = env.wait_job(retried.json()["id"])
    assert job.status == "succeeded", job.error
    # the retry's success is the run's: the next tick skips the set it merged
    again = env.post(f"/v1/schedules/{sid}/run").json()
    assert again["status"] == "skipped", again
    assert again["reason"] == ("unchanged since the last successful run "
                               f"(run {run['id']}, job {job.id})")
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204


def schedule_keys(env: Env, sid: str) -> list[str]:
    return sorted(env.store.r.scan_iter(match=f"ms:schedule:{sid}*")) + sorted(
        k for k in env.store.r.scan_iter(match="ms:redbeat:*") if sid in k)


def test_deleted_during_a_tick_nothing_is_submitted_or_left(env: Env, tmp_path: Path) -> None:
    collection = tmp_path / "adapters"
    collection.mkdir()
    copy_adapter(env.adapters["qv"], collection / "qv")
    copy_adapter(env.adapters["pattern"], collection / "pattern")
    schedule = create(env, schedule_body(env, "deleted-mid-tick",
                                         {"directory": str(collection)},
                                         str(tmp_path / "out"), template=gpu_template()))
    sid = schedule["id"]
    env.post(f"/v1/schedules/{sid}/pause")
    ticker = env.client.app.state.schedules.ticker  # type: ignore[attr-defined]
    store = ticker.schedules
    read = store.get(sid)  # a tick read the schedule, then it was deleted
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204
    queued = env.store.counts()["queued"]
    draft = ticker._draft(read, "manual")
    assert ticker._run(read, draft, False) is None  # seen deleted before the job
    assert env.store.counts()["queued"] == queued
    # what a tick records when it gets there after the delete: nothing
    late = draft.done("skipped", "a late tick")
    assert store.add_run(late) is None
    assert not store.add_open(sid, "0" * 20, draft.id, "f" * 64)
    assert store.set_paused(sid, False) is None
    assert schedule_keys(env, sid) == []


def test_the_tick_lock_is_short_and_renewed_while_the_tick_runs(env: Env, tmp_path: Path
                                                                ) -> None:
    from workers.schedules.store import TICK_LOCK_S

    collection = tmp_path / "adapters"
    collection.mkdir()
    schedule = create(env, schedule_body(env, "lock", {"directory": str(collection)},
                                         str(tmp_path / "out"), paused=True))
    sid = schedule["id"]
    key = f"ms:schedule:{sid}:tick"
    # what a scheduler killed mid-tick leaves: a lock that expires within a minute
    token = env.schedules.acquire_tick(sid)
    assert token is not None and 0 < env.store.r.ttl(key) <= 60 and TICK_LOCK_S <= 60
    env.schedules.release_tick(sid, token)
    # held by a running tick: renewed past its expiry, released at the end
    lock = env.schedules.hold_tick(sid, ttl_s=1.0, renew_s=0.2)
    assert lock is not None and env.schedules.hold_tick(sid) is None
    with lock:
        time.sleep(2.5)
        assert env.store.r.get(key) == lock.token and env.store.r.pttl(key) > 0
        assert env.post(f"/v1/schedules/{sid}/run").status_code == 409
    assert env.store.r.exists(key) == 0
    assert env.post(f"/v1/schedules/{sid}/run").json()["status"] == "skipped"
    # not renewed (its scheduler gone): it expires
    assert env.schedules.acquire_tick(sid, ttl_s=0.5) is not None
    wait_for(lambda: env.store.r.exists(key) == 0, timeout=5, what="the lock's expiry")
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204


def test_an_unexpected_error_in_a_tick_is_a_failed_run(env: Env, tmp_path: Path) -> None:
    collection = tmp_path / "adapters"
    while len(str(collection)) < 3800:
        collection /= "d" * 200
    collection.mkdir(parents=True)
    # a subdirectory whose adapter_config.json has a path longer than PATH_MAX: looking for it
    # raises OSError (ENAMETOOLONG), which `Path.is_file` does not take for "no such file"
    entry = collection / ("e" * min(255, 4095 - len(str(collection)) - 1))
    entry.mkdir()
    schedule = create(env, schedule_body(env, "unexpected", {"directory": str(collection)},
                                         str(tmp_path / "out"), paused=True))
    sid = schedule["id"]
    response = env.post(f"/v1/schedules/{sid}/run")
    assert response.status_code == 200, response.text
    run = response.json()
    assert run["status"] == "failed" and run["job_id"] is None, run
    assert run["reason"].startswith("the tick failed: OSError: [Errno 36] File name too long")
    assert "Traceback" not in run["reason"] and len(run["reason"]) < 400
    assert env.runs(sid)[0]["id"] == run["id"]
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204


def test_resuming_a_schedule_that_is_not_paused_does_not_move_its_next_run(
        env: Env, tmp_path: Path) -> None:
    collection = tmp_path / "adapters"
    collection.mkdir()
    schedule = create(env, schedule_body(env, "resumed-twice", {"directory": str(collection)},
                                         str(tmp_path / "out"), every_seconds=6))
    sid = schedule["id"]
    created = datetime.fromisoformat(schedule["created_at"])
    for _ in range(3):  # each one in time to move the first run past the next one's
        time.sleep(2.5)
        assert env.post(f"/v1/schedules/{sid}/resume").json()["paused"] is False
    first = env.wait_runs(sid, 1, timeout=30)[-1]
    assert first["trigger"] == "schedule"
    # due 6 s after creation (the scheduler looks every second); saved again at each resume,
    # it came 6 s after the last one
    assert datetime.fromisoformat(first["started_at"]) - created < timedelta(seconds=8.5), (
        first, schedule)
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204


def test_pause_and_resume_at_once_leave_the_entry_as_the_record_says(env: Env, tmp_path: Path
                                                                     ) -> None:
    import threading

    collection = tmp_path / "adapters"
    collection.mkdir()
    schedule = create(env, schedule_body(env, "racy", {"directory": str(collection)},
                                         str(tmp_path / "out"), every_seconds=3600))
    sid = schedule["id"]
    # two API processes, each with its own connections
    stores = [ScheduleStore(JobStore.from_url(env.env["MERGE_SERVICE_REDIS_URL"]),
                            env.schedules.beat_app) for _ in range(2)]
    wrong = []
    for _ in range(40):
        barrier = threading.Barrier(2)

        def flip(store: ScheduleStore, paused: bool, barrier: threading.Barrier) -> None:
            barrier.wait()
            store.set_paused(sid, paused)

        threads = [threading.Thread(target=flip, args=(store, paused, barrier))
                   for store, paused in zip(stores, (True, False), strict=True)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        paused = env.schedules.get(sid).paused  # type: ignore[union-attr]
        if env.schedules.entry_exists(sid) == paused:
            wrong.append(paused)
    assert wrong == []
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204
    assert schedule_keys(env, sid) == []


# --- adapters that could not be read: not merged, so not skipped on -------------------------

def test_an_adapter_the_preflight_could_not_fetch_is_merged_at_a_later_run(env: Env,
                                                                          tmp_path: Path
                                                                          ) -> None:
    hub = env.hub
    tag = secrets.token_hex(3)
    repos = {name: f"grace/{name}-{tag}" for name in ("qv", "pattern", "rslora")}
    shas = {name: hub.add_repo(repo, adapter_files(env.adapters[name]))
            for name, repo in repos.items()}
    schedule = create(env, schedule_body(env, "flaky-hub", {"sources": list(repos.values())},
                                         str(tmp_path / "out"), paused=True))
    sid = schedule["id"]
    flaky = f"qv-{tag}"  # the first adapter the preflight fetches
    hub.fail_next("_resolve", hub_error(403, None, "refused for a while"))
    first = env.post(f"/v1/schedules/{sid}/run").json()
    assert first["status"] == "submitted", first
    assert sorted(first["merged"]) == [f"pattern-{tag}", f"rslora-{tag}"], first
    (left_out,) = first["left_out"]
    assert left_out["name"] == flaky and left_out["transient"], left_out
    assert left_out["revision"] == shas["qv"]
    assert any(f"cannot fetch Hub repo {repos['qv']}" in p["message"]
               for p in left_out["problems"]), left_out
    assert env.wait_job(first["job_id"]).status == "succeeded"

    # its job succeeded without it: the next run is not 'unchanged', it merges the three
    second = env.post(f"/v1/schedules/{sid}/run").json()
    assert second["status"] == "submitted", second
    assert sorted(second["merged"]) == sorted(f"{n}-{tag}" for n in repos), second
    assert second["left_out"] == []
    assert env.wait_job(second["job_id"]).status == "succeeded"
    third = env.post(f"/v1/schedules/{sid}/run").json()
    assert third["status"] == "skipped" and "unchanged" in third["reason"], third
    assert third["fingerprint"] == second["fingerprint"] != first["fingerprint"]

    # a new revision the preflight cannot fetch: no merge without it (it would drop the
    # adapter from the destination), a skip that names it
    retrained = copy_adapter(env.adapters["qv"], tmp_path / "qv-v2")
    retrain(retrained, 2.0)
    hub.add_commit(repos["qv"], adapter_files(retrained))
    hub.fail_next("_resolve", hub_error(403, None, "refused for a while"))
    fourth = env.post(f"/v1/schedules/{sid}/run").json()
    assert fourth["status"] == "skipped" and fourth["job_id"] is None, fourth
    assert fourth["reason"].startswith(
        f"unchanged since the last successful run (run {second['id']}, job "
        f"{second['job_id']}) but for 1 adapter(s) that could not be read ({repos['qv']};")
    assert [o["name"] for o in fourth["left_out"]] == [flaky]
    fifth = env.post(f"/v1/schedules/{sid}/run").json()
    assert fifth["status"] == "submitted" and len(fifth["merged"]) == 3, fifth
    assert env.wait_job(fifth["job_id"]).status == "succeeded"
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204


def test_an_adapter_that_could_not_be_read_is_no_reason_to_merge(env: Env, tmp_path: Path
                                                                  ) -> None:
    adapters = {name: copy_adapter(env.adapters[name], tmp_path / name)
                for name in ("qv", "pattern", "rslora")}
    schedule = create(env, schedule_body(env, "flaky-disk", {"sources": [
        str(path) for path in adapters.values()]}, str(tmp_path / "out"), paused=True))
    sid = schedule["id"]
    first = env.post(f"/v1/schedules/{sid}/run").json()
    assert first["status"] == "submitted" and len(first["merged"]) == 3, first
    assert env.wait_job(first["job_id"]).status == "succeeded"

    # rslora cannot be read for a while (its volume away): the rest is unchanged, no merge
    away = adapters["rslora"].rename(tmp_path / "away")
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "skipped" and run["job_id"] is None, run
    assert "but for 1 adapter(s) that could not be read" in run["reason"], run
    (left_out,) = run["left_out"]
    assert left_out["origin"] == str(adapters["rslora"]) and left_out["transient"]
    away.rename(adapters["rslora"])
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "skipped" and "unchanged" in run["reason"], run
    assert run["fingerprint"] == first["fingerprint"]

    # unreadable while another adapter changed: the change is merged without it, and it is
    # merged again once it is read (its success did not make that set 'unchanged')
    away = adapters["rslora"].rename(tmp_path / "away")
    retrain(adapters["pattern"], 2.0)
    without = env.post(f"/v1/schedules/{sid}/run").json()
    assert without["status"] == "submitted" and sorted(without["merged"]) == [
        "pattern", "qv"], without
    assert env.wait_job(without["job_id"]).status == "succeeded"
    again = env.post(f"/v1/schedules/{sid}/run").json()
    assert again["status"] == "skipped" and "unchanged" in again["reason"], again
    away.rename(adapters["rslora"])
    back = env.post(f"/v1/schedules/{sid}/run").json()
    assert back["status"] == "submitted" and len(back["merged"]) == 3, back
    assert env.wait_job(back["job_id"]).status == "succeeded"
    assert env.post(f"/v1/schedules/{sid}/run").json()["status"] == "skipped"
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204


def test_an_unreadable_adapter_beside_one_left_out_for_good_is_no_reason_to_merge(
        env: Env, tmp_path: Path) -> None:
    """Merged: qv, pattern, rslora. Then rslora cannot be read and a DoRA adapter appears: a
    merge would merge nothing new (the DoRA one is left out) and only drop rslora: skipped."""
    adapters = {name: copy_adapter(env.adapters[name], tmp_path / name)
                for name in ("qv", "pattern", "rslora")}
    dora = tmp_path / "dora"  # not there yet: unreadable at first
    schedule = create(env, schedule_body(env, "dora-and-flaky", {"sources": [
        *(str(path) for path in adapters.values()), str(dora)]}, str(tmp_path / "out"),
        paused=True))
    sid = schedule["id"]
    first = env.post(f"/v1/schedules/{sid}/run").json()
    assert first["status"] == "submitted" and len(first["merged"]) == 3, first
    assert env.wait_job(first["job_id"]).status == "succeeded"

    copy_adapter(env.adapters["qv"], dora, use_dora=True)
    away = adapters["rslora"].rename(tmp_path / "away")
    run = env.post(f"/v1/schedules/{sid}/run").json()
    assert run["status"] == "skipped" and run["job_id"] is None, run
    assert "but for 1 adapter(s) that could not be read" in run["reason"], run
    left_out = {o["name"]: o for o in run["left_out"]}
    assert left_out["dora"]["transient"] is False and left_out["rslora"]["transient"], run
    away.rename(adapters["rslora"])
    back = env.post(f"/v1/schedules/{sid}/run").json()  # rslora read again, dora left out
    assert back["status"] == "submitted" and len(back["merged"]) == 3, back
    env.wait_job(back["job_id"])
    assert env.client.delete(f"/v1/schedules/{sid}", headers=env.headers()).status_code == 204
