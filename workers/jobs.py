"""The job store: job records, listing indexes, event streams, cancel flags, locks, in Redis.

Used by the API (create, read, list, cancel) and by the workers (state, progress, results).
The record in Redis is the source of truth (DESIGN.md section 5); Celery only carries job ids.

Keys (prefix `ms:`):

- `job:{id}`: a hash, one field per record field, each JSON-encoded, plus internal fields
  (`_submitted_by`, `_attempts`, `_queue`, `_sent_at`, `_sends`, `_owner`) that the API never
  returns.
- `jobs`, `jobs:status:{status}`, `jobs:name:{name}`: sorted sets of job ids, all at score 0 so
  that they sort lexicographically; ids start with the creation time in hex, so a reverse
  lexicographic range is newest first and a cursor is simply the last id seen.
- `job:{id}:events`: a stream of `state` and `progress` events (SSE resumes by stream id).
- `events`: every job's events in one capped stream, each with its `job` id (the jobs list's
  SSE, `GET /v1/events`).
- `job:{id}:cancel`, `job:{id}:lock`, `job:{id}:report`: cancel flag; the lock a running
  worker holds and refreshes (its expiry means the worker died); the finished job's
  `merge_report.json`.
- `idem:{sha256 of scope:key}`: an `Idempotency-Key` (scoped to the caller) and the job it
  created, for a day; while the request that claimed the key runs,
  `pending:{token}:{body digest}`.
- `workers`, `worker:{name}`: live workers (last heartbeat, queues) for routing and readiness.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import redis
import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, Field

from merge_service.spec import JobSpec

JobStatus = Literal["queued", "validating", "running", "pushing", "succeeded", "failed",
                    "cancelled"]
STATUSES: tuple[str, ...] = ("queued", "validating", "running", "pushing", "succeeded",
                             "failed", "cancelled")
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE = frozenset({"validating", "running", "pushing"})  # a worker holds the job
JOB_ID = re.compile(r"^[0-9a-f]{20}$")
IDEMPOTENCY_TTL_S = 24 * 3600
IDEMPOTENCY_PENDING_S = 600  # a claim whose request died (API killed mid-submit) is freed then
RESEND_BACKOFF_MAX = 6  # a queued job is re-sent after grace, 2 x grace, ... 64 x grace
EVENTS_MAXLEN = 10_000  # progress is per tensor; the terminal event is always the last one
ALL_EVENTS_MAXLEN = 10_000  # the list stream: a client further behind refreshes its list

_PUBLIC = ("id", "name", "status", "spec", "progress", "created_at", "started_at",
           "finished_at", "worker", "result", "error", "schedule_id")


# --- the job record (DESIGN.md section 4) ------------------------------------------------------

class JobProgress(BaseModel):
    stage: str | None = Field(None, description="resolving, preflight, merging, finalizing, "
                                                  "pushing")
    done: int = 0
    total: int = 0
    current: str | None = Field(None, description="the tensor being worked on")


class JobResult(BaseModel):
    destination: str
    url: str | None = Field(None, description="Hub destinations: the commit (or PR) URL")
    files: list[str] = Field(default_factory=list)
    revision: str | None = Field(None, description="Hub destinations: the commit sha")


class JobError(BaseModel):
    type: str = Field(description="the exception type, e.g. PreflightError, MergeRuntimeError")
    message: str
    details: dict[str, Any] | None = Field(None, description="e.g. `problems`: every problem "
                                                             "found, each with model/tensor/field")


class JobRecord(BaseModel):
    id: str
    name: str | None = None
    status: JobStatus
    spec: JobSpec = Field(description="the resolved spec: Hub revisions pinned, paths absolute")
    progress: JobProgress = Field(default_factory=JobProgress)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker: str | None = None
    result: JobResult | None = None
    error: JobError | None = None
    schedule_id: str | None = None


class JobState(BaseModel):
    """What a state event carries (its `data`): the record without its name, spec, progress
    and creation time, and why the service changed the state where it did so itself."""

    model_config = ConfigDict(extra="forbid")
    id: str
    status: JobStatus
    started_at: datetime | None = None
    finished_at: datetime | None = None
    worker: str | None = None
    result: JobResult | None = None
    error: JobError | None = None
    reason: str | None = Field(None, description="where the service changed the state itself, "
                               "why (`worker lost; requeued`)")


_STATE_FIELDS = tuple(name for name in JobState.model_fields if name != "reason")


class JobEvent(BaseModel):
    id: str = Field(description="the stream id; send it back as Last-Event-ID to resume")
    type: Literal["state", "progress"]
    data: dict[str, Any]


_last_id = [0, 0, 0]  # (pid, milliseconds, suffix) of this process's latest id
_id_lock = threading.Lock()


def new_job_id() -> str:
    """20 hex digits: milliseconds since the epoch (12) then a suffix (8); sorts by time.

    The suffix is random, except for ids this process makes within one millisecond (or after
    the clock stepped back): those take the one before's plus one, so that listing newest
    first shows a client's jobs in the order it submitted them (as a monotonic ULID does). A
    forked child starts from a random suffix of its own, never from its parent's."""
    ms, pid = int(time.time() * 1000), os.getpid()
    with _id_lock:
        last_pid, last_ms, last_suffix = _last_id
        if pid != last_pid:
            last_ms = 0
        if ms <= last_ms and last_suffix < 0xFFFFFFFF:
            ms, suffix = last_ms, last_suffix + 1
        else:
            ms, suffix = max(ms, last_ms + 1), secrets.randbits(32)
        _last_id[:] = [pid, ms, suffix]
    return f"{ms:012x}{suffix:08x}"


def now() -> datetime:
    return datetime.now(UTC)


def timestamp() -> str:
    """Now, as the record stores and returns it (pydantic's JSON form of a UTC datetime)."""
    return now().isoformat().replace("+00:00", "Z")


def fingerprint(secret: str) -> str:
    """A stable, non-reversible name for a key (never the key itself)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


class IdempotencyConflict(Exception):
    """The same Idempotency-Key was used before with a different body."""


class IdempotencyInProgress(Exception):
    """The same Idempotency-Key and body are being submitted by a request still running."""


@dataclass(frozen=True)
class IdempotencyClaim:
    """An `Idempotency-Key` claimed for a job not created yet (`JobStore.claim_idempotency`)."""

    key: str  # the Redis key
    digest: str  # of the request body
    value: str  # what the key holds until the job is created: `pending:{token}:{digest}`

    def job_value(self, job_id: str) -> str:
        return f"{job_id}:{self.digest}"


class JobStore:
    def __init__(self, client: redis.Redis, prefix: str = "ms:") -> None:
        self.r = client
        self.p = prefix
        # compare-and-set on the lock value: only its owner refreshes or releases a lock
        self._refresh = client.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end")
        self._release = client.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('del', KEYS[1]) else return 0 end")
        self._swap = client.register_script(
            "if redis.call('get', KEYS[1]) == ARGV[1] then "
            "return redis.call('set', KEYS[1], ARGV[2], 'px', ARGV[3]) else return 0 end")

    @classmethod
    def from_url(cls, url: str) -> JobStore:
        return cls(redis.Redis.from_url(url, decode_responses=True, health_check_interval=30))

    # keys

    def job_key(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}"

    def events_key(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}:events"

    def _cancel_key(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}:cancel"

    def _lock_key(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}:lock"

    def _report_key(self, job_id: str) -> str:
        return f"{self.p}job:{job_id}:report"

    def _index(self, status: str | None = None, name: str | None = None) -> str:
        if name is not None:
            return f"{self.p}jobs:name:{name}"
        if status is not None:
            return f"{self.p}jobs:status:{status}"
        return f"{self.p}jobs"

    # create and read

    def create(self, spec: JobSpec, *, queue: str, submitted_by: str | None = None,
               schedule_id: str | None = None, hub_secret: str | None = None,
               idempotency: IdempotencyClaim | None = None) -> JobRecord:
        """Store a new queued job. With `idempotency` (a claim), the key is pointed at the job
        in the same transaction that stores it: a concurrent request with the same key sees
        either the claim (and waits) or the job, never a key without its job. `hub_secret`:
        the name of the secret whose Hub token the job uses (its schedule's), kept out of the
        record."""
        record = JobRecord(id=new_job_id(), name=spec.name, status="queued", spec=spec,
                           created_at=now(), schedule_id=schedule_id)
        fields = _encode(record.model_dump(mode="json"))
        fields |= {"_submitted_by": json.dumps(submitted_by), "_attempts": "0",
                   "_queue": json.dumps(queue), "_sent_at": repr(time.time()), "_sends": "0",
                   "_hub_secret": json.dumps(hub_secret)}

        def store(pipe: redis.client.Pipeline) -> None:
            if idempotency is not None and pipe.get(idempotency.key) != idempotency.value:
                raise IdempotencyInProgress("the claim on the Idempotency-Key expired")
            pipe.multi()
            pipe.hset(self.job_key(record.id), mapping=fields)
            pipe.zadd(self._index(), {record.id: 0})
            pipe.zadd(self._index(status="queued"), {record.id: 0})
            if record.name is not None:
                pipe.zadd(self._index(name=record.name), {record.id: 0})
            self._add_event(pipe, record.id, "state",
                            _state_data(record.model_dump(mode="json")))
            if idempotency is not None:
                pipe.set(idempotency.key, idempotency.job_value(record.id),
                         ex=IDEMPOTENCY_TTL_S)

        self.r.transaction(store, *([idempotency.key] if idempotency is not None else []))
        return record

    def _idem_key(self, key: str) -> str:
        return f"{self.p}idem:{hashlib.sha256(key.encode()).hexdigest()}"

    def claim_idempotency(self, key: str, digest: str) -> IdempotencyClaim | JobRecord:
        """Claim the scoped `Idempotency-Key` `key` for a new job, or return the job that an
        earlier request with this key and body created. Raises `IdempotencyConflict` (the
        key was used with another body) or `IdempotencyInProgress` (a request with this key
        and body is still running: its job does not exist yet)."""
        idem_key = self._idem_key(key)
        claim = IdempotencyClaim(idem_key, digest, f"pending:{secrets.token_hex(8)}:{digest}")
        while True:
            if self.r.set(idem_key, claim.value, nx=True, px=IDEMPOTENCY_PENDING_S * 1000):
                return claim
            stored = self.r.get(idem_key)
            if stored is None:
                continue  # released or expired between the two reads
            holder, _, stored_digest = stored.rpartition(":")
            if stored_digest != digest:
                where = "a request still running" if holder.startswith("pending:") \
                    else f"job {holder}"
                raise IdempotencyConflict(f"Idempotency-Key was already used for {where} "
                                          "with a different spec")
            if holder.startswith("pending:"):
                raise IdempotencyInProgress("a request with this Idempotency-Key is still "
                                            "being processed")
            record = self.get(holder)
            if record is not None:
                return record
            # its job was deleted: take the key over, unless another request just did
            if self._swap(keys=[idem_key], args=[stored, claim.value,
                                                 IDEMPOTENCY_PENDING_S * 1000]):
                return claim

    def release_idempotency(self, claim: IdempotencyClaim, job_id: str | None = None) -> None:
        """Free the key of a submit that produced no queued job (preflight refused the spec,
        the broker refused the job): the same key may then be used again at once."""
        for value in (claim.value, *([claim.job_value(job_id)] if job_id else [])):
            self._release(keys=[claim.key], args=[value])

    def get(self, job_id: str) -> JobRecord | None:
        if not JOB_ID.match(job_id):
            return None
        raw = self.r.hgetall(self.job_key(job_id))
        return _decode_record(raw) if raw else None

    async def get_json(self, client: aioredis.Redis, job_id: str) -> str | None:
        """The record as JSON text, assembled from the stored fields without decoding them:
        the hot path of `GET /v1/jobs/{id}` (fields were validated when written). On the API's
        asyncio client: a polled record is answered on the event loop, with no thread hop."""
        if not JOB_ID.match(job_id):
            return None
        raw = await client.hmget(self.job_key(job_id), _PUBLIC)
        return _record_json(raw) if raw[0] is not None else None

    async def list_json(self, client: aioredis.Redis, *, limit: int = 20,
                        after: str | None = None) -> tuple[list[str], str | None]:
        """`list` without filters, as JSON texts (the hot path of `GET /v1/jobs`), on the
        API's asyncio client."""
        upper = f"({after}" if after else "+"
        ids = await client.zrevrangebylex(self._index(), upper, "-", start=0, num=limit + 1)
        pipe = client.pipeline(transaction=False)
        for job_id in ids[:limit]:
            pipe.hmget(self.job_key(job_id), _PUBLIC)
        records = [_record_json(raw) for raw in (await pipe.execute() if ids else [])
                   if raw[0] is not None]
        return records, (ids[limit - 1] if len(ids) > limit else None)

    def internal(self, job_id: str) -> dict[str, Any]:
        """The fields the API does not return: `submitted_by`, `attempts`, `queue`, `owner`
        (the `worker:pid` of the latest attempt that changed its state), `hub_secret`."""
        values = self.r.hmget(self.job_key(job_id), "_submitted_by", "_attempts", "_queue",
                              "_owner", "_hub_secret")
        submitted_by, attempts, queue, owner, hub_secret = values
        return {"submitted_by": json.loads(submitted_by) if submitted_by else None,
                "attempts": int(attempts or 0), "queue": json.loads(queue) if queue else None,
                "owner": json.loads(owner) if owner else None,
                "hub_secret": json.loads(hub_secret) if hub_secret else None}

    def list(self, *, status: str | None = None, name: str | None = None, limit: int = 20,
             after: str | None = None) -> tuple[builtins.list[JobRecord], str | None]:
        """Newest first. Returns the page and the id to continue after (None: no more)."""
        index = self._index(status=status, name=name)
        both = status is not None and name is not None  # the name index, filtered by status
        page = max(limit + 1, 50) if both else limit + 1
        upper = f"({after}" if after else "+"
        found: list[JobRecord] = []
        while True:
            ids = self.r.zrevrangebylex(index, upper, "-", start=0, num=page)
            pipe = self.r.pipeline(transaction=False)
            for job_id in ids:
                pipe.hgetall(self.job_key(job_id))
            for raw in pipe.execute() if ids else []:
                if not raw:
                    continue  # deleted between the two reads
                record = _decode_record(raw)
                if both and record.status != status:
                    continue
                if len(found) == limit:  # one more match exists: the page is full
                    return found, found[-1].id
                found.append(record)
            if len(ids) < page:
                return found, None
            upper = f"({ids[-1]}"

    def counts(self) -> dict[str, int]:
        pipe = self.r.pipeline(transaction=False)
        for status in STATUSES:
            pipe.zcard(self._index(status=status))
        return dict(zip(STATUSES, pipe.execute(), strict=True))

    # state changes

    def transition(self, job_id: str, to: str, allowed_from: frozenset[str] | set[str],
                   *, owner: str | None = None, unlocked: bool = False,
                   **fields: Any) -> JobRecord | None:
        """Atomically move a job to status `to` (if its status is in `allowed_from` and, with
        `owner`, the job's lock is still `owner`'s; with `unlocked`, no worker holds it), set
        `fields` and publish a state event. Returns the new record, or None if refused."""
        key, lock = self.job_key(job_id), self._lock_key(job_id)
        outcome: dict[str, Any] = {}

        def change(pipe: redis.client.Pipeline) -> None:
            raw = pipe.hgetall(key)
            if not raw or json.loads(raw["status"]) not in allowed_from or (
                    owner is not None and pipe.get(lock) != owner) or (
                    unlocked and pipe.exists(lock)):
                outcome.clear()
                return
            current = json.loads(raw["status"])
            updates = {"status": to, **fields}
            record = {k: json.loads(v) for k, v in raw.items() if k in _PUBLIC} | updates
            pipe.multi()
            pipe.hset(key, mapping=_encode(updates | ({"_owner": owner} if owner else {})))
            if current != to:
                pipe.zrem(self._index(status=current), job_id)
                pipe.zadd(self._index(status=to), {job_id: 0})
            self._add_event(pipe, job_id, "state", _state_data(record))
            outcome["record"] = record

        self.r.transaction(change, key, *([lock] if owner or unlocked else []))
        record = outcome.get("record")
        return JobRecord.model_validate(record) if record else None

    def _owned_write(self, job_id: str, owner: str | None,
                     write: Callable[[redis.client.Pipeline], object]) -> bool:
        """Run `write(pipe)` in a transaction if the job is active and, with `owner`, its
        lock is `owner`'s (a worker that lost its lock writes nothing). Returns whether it
        ran."""
        key, lock = self.job_key(job_id), self._lock_key(job_id)
        done: list[bool] = []

        def check_then_write(pipe: redis.client.Pipeline) -> None:
            done.clear()
            status = pipe.hget(key, "status")
            if status is None or json.loads(status) not in ACTIVE or (
                    owner is not None and pipe.get(lock) != owner):
                return
            pipe.multi()
            write(pipe)
            done.append(True)

        self.r.transaction(check_then_write, key, lock)
        return bool(done)

    def set_progress(self, job_id: str, progress: JobProgress,
                     owner: str | None = None) -> bool:
        """Record progress while the job is active (and `owner` holds it); False if not."""
        data = progress.model_dump(mode="json")

        def write(pipe: redis.client.Pipeline) -> None:
            pipe.hset(self.job_key(job_id), "progress", json.dumps(data))
            self._add_event(pipe, job_id, "progress", data)

        return self._owned_write(job_id, owner, write)

    def add_attempt(self, job_id: str) -> int:
        return int(self.r.hincrby(self.job_key(job_id), "_attempts", 1))

    def request_cancel(self, job_id: str) -> None:
        self.r.set(self._cancel_key(job_id), "1")

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.exists(self._cancel_key(job_id)))

    def set_report(self, job_id: str, report: dict[str, Any], owner: str | None = None) -> bool:
        text = json.dumps(report)
        return self._owned_write(job_id, owner,
                                 lambda pipe: pipe.set(self._report_key(job_id), text))

    def get_report(self, job_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self._report_key(job_id))
        return json.loads(raw) if raw else None

    # events

    def all_events_key(self) -> str:
        return f"{self.p}events"

    def _add_event(self, pipe: Any, job_id: str, kind: str, data: dict[str, Any]) -> None:
        text = json.dumps(data)
        pipe.xadd(self.events_key(job_id), {"type": kind, "data": text},
                  maxlen=EVENTS_MAXLEN, approximate=True)
        # the same event for the jobs list, in the same pipeline (MULTI where the caller's is)
        pipe.xadd(self.all_events_key(), {"job": job_id, "type": kind, "data": text},
                  maxlen=ALL_EVENTS_MAXLEN, approximate=True)

    def events(self, job_id: str, after: str = "0-0", count: int = 1000) -> builtins.list[JobEvent]:
        entries = self.r.xrange(self.events_key(job_id), min=f"({after}" if after != "0-0"
                                else "-", count=count)
        return [decode_event(event_id, fields) for event_id, fields in entries]

    # workers: locks and liveness

    def acquire_lock(self, job_id: str, owner: str, ttl_s: float) -> bool:
        return bool(self.r.set(self._lock_key(job_id), owner, nx=True, px=int(ttl_s * 1000)))

    def refresh_lock(self, job_id: str, owner: str, ttl_s: float) -> bool:
        return bool(self._refresh(keys=[self._lock_key(job_id)],
                                  args=[owner, int(ttl_s * 1000)]))

    def release_lock(self, job_id: str, owner: str) -> None:
        self._release(keys=[self._lock_key(job_id)], args=[owner])

    def lock_owner(self, job_id: str) -> str | None:
        return self.r.get(self._lock_key(job_id))

    def owned_and_cancelled(self, job_id: str, owner: str) -> tuple[bool, bool]:
        """Whether `owner` still holds the job's lock, and whether a cancel was requested:
        what a running worker checks between layers, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        pipe.get(self._lock_key(job_id))
        pipe.exists(self._cancel_key(job_id))
        held_by, cancel = pipe.execute()
        return held_by == owner, bool(cancel)

    def worker_heartbeat(self, name: str, info: dict[str, Any], ttl_s: float) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.zadd(f"{self.p}workers", {name: time.time()})
        pipe.set(f"{self.p}worker:{name}", json.dumps(info), px=int(ttl_s * 1000))
        pipe.execute()

    def worker_gone(self, name: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.zrem(f"{self.p}workers", name)
        pipe.delete(f"{self.p}worker:{name}")
        pipe.execute()

    def live_workers(self, ttl_s: float) -> builtins.list[dict[str, Any]]:
        """Workers whose last heartbeat is younger than `ttl_s`; stale entries are dropped."""
        key = f"{self.p}workers"
        cutoff = time.time() - ttl_s
        self.r.zremrangebyscore(key, "-inf", cutoff)
        names = self.r.zrange(key, 0, -1)
        if not names:
            return []
        infos = self.r.mget([f"{self.p}worker:{n}" for n in names])
        return [json.loads(i) for i in infos if i]

    def orphaned_jobs(self) -> builtins.list[str]:
        """Jobs a worker holds (validating, running, pushing) whose lock has expired."""
        ids: list[str] = []
        for status in sorted(ACTIVE):
            ids += self.r.zrange(self._index(status=status), 0, -1)
        if not ids:
            return []
        held = self.r.mget([self._lock_key(i) for i in ids])
        return [i for i, owner in zip(ids, held, strict=True) if owner is None]

    def requeue_orphan(self, job_id: str) -> JobRecord | None:
        """Back to `queued` if the job is still active and unlocked (one reaper wins)."""
        key, lock = self.job_key(job_id), self._lock_key(job_id)
        outcome: dict[str, Any] = {}

        def change(pipe: redis.client.Pipeline) -> None:
            outcome.clear()  # a WATCH retry starts over
            raw = pipe.hgetall(key)
            if not raw or pipe.exists(lock) or json.loads(raw["status"]) not in ACTIVE:
                return
            current = json.loads(raw["status"])
            updates = {"status": "queued", "worker": None,
                       "progress": JobProgress().model_dump(mode="json")}
            record = {k: json.loads(v) for k, v in raw.items() if k in _PUBLIC} | updates
            pipe.multi()
            pipe.hset(key, mapping=_encode(updates) | {
                "_sent_at": repr(time.time()), "_sends": "0"})
            pipe.zrem(self._index(status=current), job_id)
            pipe.zadd(self._index(status="queued"), {job_id: 0})
            self._add_event(pipe, job_id, "state", {**_state_data(record),
                                                   "reason": "worker lost; requeued"})
            outcome["record"] = record

        self.r.transaction(change, key, lock)
        record = outcome.get("record")
        return JobRecord.model_validate(record) if record else None

    def delete_ended_before(self, cutoff: datetime, limit: int = 500) -> builtins.list[str]:
        """Delete the jobs that ended before `cutoff` (record, events, report, index entries),
        at most `limit` per call, oldest first; returns their ids. Only jobs created before the
        cutoff can have ended before it, and ids sort by creation time, so each status index is
        read from its start up to the cutoff's id."""
        upper = f"({int(cutoff.timestamp() * 1000):012x}"
        deleted: builtins.list[str] = []
        for status in sorted(TERMINAL):
            for job_id in self.r.zrangebylex(self._index(status=status), "-", upper,
                                             start=0, num=limit - len(deleted)):
                if self._delete_if_ended_before(job_id, cutoff):
                    deleted.append(job_id)
        return deleted

    def _delete_if_ended_before(self, job_id: str, cutoff: datetime) -> bool:
        key = self.job_key(job_id)
        outcome: builtins.list[bool] = []

        def delete(pipe: redis.client.Pipeline) -> None:
            outcome.clear()
            status, finished_at, name = pipe.hmget(key, "status", "finished_at", "name")
            ended = json.loads(finished_at) if finished_at else None
            if status is None or json.loads(status) not in TERMINAL or ended is None \
                    or datetime.fromisoformat(ended) >= cutoff:
                return
            pipe.multi()
            pipe.delete(key, self.events_key(job_id), self._report_key(job_id),
                        self._cancel_key(job_id), self._lock_key(job_id))
            pipe.zrem(self._index(), job_id)
            pipe.zrem(self._index(status=json.loads(status)), job_id)
            if name and json.loads(name) is not None:
                pipe.zrem(self._index(name=json.loads(name)), job_id)
            outcome.append(True)

        self.r.transaction(delete, key)
        return bool(outcome)

    def unsent_jobs(self, grace_s: float) -> builtins.list[tuple[str, str]]:
        """Queued, unlocked jobs whose task was last sent more than `grace_s` ago (doubling
        with each re-send, up to 64 x): their message may be lost (the API died before
        sending it, a send failed, a delivery was dropped while a dead attempt's lock
        lingered), which the caller checks in the broker. Returns (job id, the `_sent_at`
        seen) pairs for `claim_resend`."""
        ids = self.r.zrange(self._index(status="queued"), 0, -1)
        if not ids:
            return []
        pipe = self.r.pipeline(transaction=False)
        for job_id in ids:
            pipe.hmget(self.job_key(job_id), "_sent_at", "_sends")
            pipe.exists(self._lock_key(job_id))
        replies = pipe.execute()
        found, now_s = [], time.time()
        for job_id, (sent_at, sends), locked in zip(ids, replies[::2], replies[1::2],
                                                    strict=True):
            wait = grace_s * 2 ** min(int(sends or 0), RESEND_BACKOFF_MAX)
            if not locked and now_s - float(sent_at or 0) > wait:
                found.append((job_id, sent_at or ""))
        return found

    def claim_resend(self, job_id: str, seen_sent_at: str) -> str | None:
        """Note a re-send of a queued job (one reaper wins); returns its queue, or None."""
        key, lock = self.job_key(job_id), self._lock_key(job_id)
        outcome: list[str] = []

        def change(pipe: redis.client.Pipeline) -> None:
            outcome.clear()  # a WATCH retry starts over
            status, sent_at, queue = pipe.hmget(key, "status", "_sent_at", "_queue")
            if status is None or json.loads(status) != "queued" or pipe.exists(lock) \
                    or (sent_at or "") != seen_sent_at:
                return
            pipe.multi()
            pipe.hset(key, "_sent_at", repr(time.time()))
            pipe.hincrby(key, "_sends", 1)
            outcome.append(json.loads(queue) if queue else "cpu")

        self.r.transaction(change, key, lock)
        return outcome[0] if outcome else None


def decode_event(event_id: str, fields: dict[str, str]) -> JobEvent:
    return JobEvent(id=event_id, type=fields["type"], data=json.loads(fields["data"]))


def _state_data(record: dict[str, Any]) -> dict[str, Any]:
    """What a state event carries (`JobState`) of a record."""
    return {k: record.get(k) for k in _STATE_FIELDS}


def _record_json(values: list[str | None]) -> str:
    return "{" + ",".join(f'"{k}":{v if v is not None else "null"}'
                          for k, v in zip(_PUBLIC, values, strict=True)) + "}"


def _encode(fields: dict[str, Any]) -> dict[str, str]:
    return {k: json.dumps(v) for k, v in fields.items()}


def _decode_record(raw: dict[str, str]) -> JobRecord:
    return JobRecord.model_validate({k: json.loads(v) for k, v in raw.items() if k in _PUBLIC})

