"""`GET /v1/jobs/{id}/events` and `GET /v1/events`: event streams as Server-Sent Events.

Each event is `id: <stream id>`, `event: state|progress`, `data: <json>`. A client that
reconnects with `Last-Event-ID` gets what it missed (events live in Redis streams). A job's
stream starts, without it, from the job's first event and ends after the terminal state event.
The list stream (every job's events, each `data` with its `job_id`) starts from the events
after the request and never ends by itself; resumed from a `Last-Event-ID` older than the
oldest event it still holds (it keeps the latest `ALL_EVENTS_MAXLEN`), it first sends an
`event: reset`: events were dropped, read `GET /v1/jobs` again. Both send a `: keepalive`
comment after `KEEPALIVE_MS` without events, and end (the client resumes) if Redis fails
mid-stream.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.errors import BadRequest
from workers.jobs import TERMINAL, JobStore, decode_event

log = logging.getLogger("merge_service.api")

KEEPALIVE_MS = 15_000
# a read blocked for KEEPALIVE_MS must not hit the socket timeout (redis-py's default: 5 s)
STREAM_SOCKET_TIMEOUT_S = KEEPALIVE_MS / 1000 + 15
UNAVAILABLE = ": the job store is unavailable; reconnect with Last-Event-ID\n\n"
EVENT_ID = re.compile(r"^(\d+-\d+)?$")  # a Redis stream id (empty: none)


def check_event_id(value: str | None) -> str:
    if value is None or value == "":
        return "0-0"
    if not EVENT_ID.match(value) or any(int(part) >= 2**64
                                        for part in value.split("-")):  # Redis's range
        raise BadRequest(f"Last-Event-ID must be a stream id such as 1700000000000-0, got "
                         f"{value[:40]!r}")
    return value


async def job_events(client: aioredis.Redis, store: JobStore, job_id: str, after: str
                     ) -> AsyncIterator[str]:
    """`client` is the API's streaming client (`STREAM_SOCKET_TIMEOUT_S`)."""
    key = store.events_key(job_id)
    cursor = after
    try:
        while True:
            # a job that has ended gets its remaining events without waiting for more (its
            # final state event is written with its status: a wait would only wait it out)
            status = await client.hget(store.job_key(job_id), "status")
            ended = status is None or json.loads(status) in TERMINAL
            answer = await client.xread({key: cursor}, count=500,
                                        block=None if ended else KEEPALIVE_MS)
            if not answer:
                if ended:
                    return  # finished before this connection, and nothing more after `after`
                yield ": keepalive\n\n"
                continue
            for event_id, fields in answer[0][1]:
                event = decode_event(event_id, fields)
                cursor = event_id
                yield (f"id: {event.id}\nevent: {event.type}\n"
                       f"data: {json.dumps(event.data)}\n\n")
                if event.type == "state" and event.data.get("status") in TERMINAL:
                    return
    except RedisError as exc:
        log.warning("events of job %s: Redis failed mid-stream (%s); stream ended",
                    job_id, type(exc).__name__)
        yield UNAVAILABLE


def _stream_id(value: str) -> tuple[int, int]:
    milliseconds, _, sequence = value.partition("-")
    return int(milliseconds), int(sequence or 0)


async def latest_event_id(client: aioredis.Redis, store: JobStore) -> str:
    """Where a new list stream starts: after the newest event now (fixed before the response
    starts, so a client that lists the jobs once the stream is open misses nothing)."""
    newest = await client.xrevrange(store.all_events_key(), count=1)
    return newest[0][0] if newest else "0-0"


async def all_events(client: aioredis.Redis, store: JobStore, after: str) -> AsyncIterator[str]:
    """Every job's events after `after`, until the client leaves. `data` is the job stream's
    `data` plus `job_id`."""
    key = store.all_events_key()
    cursor = after
    try:
        yield ": connected\n\n"  # the headers go out at once; the client knows it is live
        oldest = await client.xrange(key, count=1)
        if oldest and after != "0-0" and _stream_id(after) < _stream_id(oldest[0][0]):
            yield ("event: reset\ndata: {\"reason\": \"events after Last-Event-ID were "
                   "dropped; read GET /v1/jobs again\"}\n\n")
        while True:
            answer = await client.xread({key: cursor}, count=500, block=KEEPALIVE_MS)
            if not answer:
                yield ": keepalive\n\n"
                continue
            for event_id, fields in answer[0][1]:
                cursor = event_id
                data = {"job_id": fields["job"], **json.loads(fields["data"])}
                yield f"id: {event_id}\nevent: {fields['type']}\ndata: {json.dumps(data)}\n\n"
    except RedisError as exc:
        log.warning("events of all jobs: Redis failed mid-stream (%s); stream ended",
                    type(exc).__name__)
        yield UNAVAILABLE
