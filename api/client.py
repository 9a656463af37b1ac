"""A small REST client of the service (used by `merge-service submit`, the demo, the bench)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx

from merge_service.errors import InvalidInputError, MergeServiceError, Problem

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})


class ServiceError(MergeServiceError):
    """The service could not be reached or answered with an error that is not the spec's."""


class ServiceClient:
    def __init__(self, url: str, key: str | None = None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceError(f"cannot reach the service at {self.url} ({exc}); is "
                               "`merge-service up` running?") from None
        check(response)
        return response

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None
               ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/v1/jobs", json=spec, headers=headers).json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._request("POST", f"/v1/jobs/{job_id}/cancel").json()

    def events(self, job_id: str, retries: int = 5) -> Iterator[dict[str, Any]]:
        """The job's events (`{"id", "type", "data"}`) until its terminal state; reconnects
        with Last-Event-ID when the connection drops."""
        last_event_id: str | None = None
        attempt = 0
        while True:
            headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
            try:
                with self.http.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                                      timeout=httpx.Timeout(60.0, read=None)) as response:
                    if response.status_code >= 400:
                        response.read()
                        check(response)
                    for event in parse_sse(response.iter_lines()):
                        last_event_id = event["id"]
                        attempt = 0
                        yield event
                        if event["type"] == "state" and event["data"]["status"] in TERMINAL:
                            return
            except httpx.TransportError:
                attempt += 1
                if attempt > retries:
                    raise ServiceError(f"lost the event stream of job {job_id}") from None
                time.sleep(min(2.0**attempt * 0.1, 5.0))
                continue
            # the server ended the stream without a terminal event: the job is finished
            if self.job(job_id)["status"] in TERMINAL:
                return


def check(response: httpx.Response) -> None:
    """Raise for an error answer: `InvalidInputError` for what the caller must fix (exit
    code 1), `ServiceError` for the rest."""
    if response.status_code < 400:
        return
    label = f"{response.request.method} {response.request.url.path}"
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        raise ServiceError(f"{label}: HTTP {response.status_code}") from None
    problems = [Problem(**p) for p in error.get("problems") or []]
    if response.status_code == 422:
        raise InvalidInputError(problems or [Problem(error["message"])])
    if response.status_code in (400, 401, 403, 404, 409, 413):
        raise InvalidInputError(f"{error['type']}: {error['message']}")
    raise ServiceError(f"{label}: {error['type']}: {error['message']}")


def parse_sse(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    """`id:`/`event:`/`data:` blocks separated by blank lines; comments (`:`) skipped."""
    event: dict[str, Any] = {}
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield {"id": event.get("id"), "type": event.get("event", "message"),
                       "data": json.loads("\n".join(data))}
            event, data = {}, []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "data":
                data.append(value)
            else:
                event[field] = value
