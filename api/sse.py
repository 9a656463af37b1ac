"""`GET /v1/jobs/{id}/events`: the job's event stream as Server-Sent Events.

Each event is `id: <stream id>`, `event: state|progress`, `data: <json>`. A client that
reconnects with `Last-Event-ID` gets what it missed (events live in a Redis stream). Without it
the stream starts from the job's first event. The stream ends after the terminal state event.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import redis.asyncio as aioredis

from api.errors import BadRequest
from workers.jobs import TERMINAL, JobStore, decode_event

KEEPALIVE_MS = 15_000
_EVENT_ID = re.compile(r"^\d+-\d+$")


def check_event_id(value: str | None) -> str:
    if value is None or value == "":
        return "0-0"
    if not _EVENT_ID.match(value):
        raise BadRequest(f"Last-Event-ID must be a stream id such as 1700000000000-0, got "
                         f"{value[:40]!r}")
    return value


async def job_events(client: aioredis.Redis, store: JobStore, job_id: str, after: str
                     ) -> AsyncIterator[str]:
    key = store.events_key(job_id)
    cursor = after
    while True:
        answer = await client.xread({key: cursor}, count=500, block=KEEPALIVE_MS)
        if not answer:
            status = await client.hget(store.job_key(job_id), "status")
            if status is None or json.loads(status) in TERMINAL:
                return  # finished before this connection, and nothing more after `after`
            yield ": keepalive\n\n"
            continue
        for event_id, fields in answer[0][1]:
            event = decode_event(event_id, fields)
            cursor = event_id
            yield f"id: {event.id}\nevent: {event.type}\ndata: {json.dumps(event.data)}\n\n"
            if event.type == "state" and event.data.get("status") in TERMINAL:
                return
