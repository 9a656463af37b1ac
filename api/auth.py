"""Bearer API keys with roles `read` < `submit` < `admin` (DESIGN.md section 4).

`MERGE_SERVICE_API_KEYS="key1:admin,key2:read"`. With no key configured the API is in local
mode: every request is allowed, and `merge-service api`/`up` refuse to bind anything but a
loopback address. `LocalOnly` guards local mode inside the app too: requests from a
non-loopback address (a server started some other way), for a host name other than a loopback
one (a web page whose DNS name was rebound to 127.0.0.1), forwarded by a proxy for another
address, or writes that a page of another origin sends (cross-site requests need no DNS
trick) are refused.

Keys are compared in constant time and never logged or returned; a key is known elsewhere only
by its fingerprint (a truncated sha256).
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import Depends, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from api.errors import Forbidden, Unauthorized
from workers.jobs import fingerprint

Role = Literal["read", "submit", "admin"]
ROLE_RANK: dict[str, int] = {"read": 0, "submit": 1, "admin": 2}


@dataclass(frozen=True)
class Principal:
    name: str  # "local", or the key's fingerprint
    role: str

    def allows(self, role: str) -> bool:
        return ROLE_RANK[self.role] >= ROLE_RANK[role]


LOCAL = Principal("local", "admin")


@dataclass(frozen=True)
class ApiKey:
    secret: bytes
    principal: Principal


def parse_api_keys(value: SecretStr | None) -> list[ApiKey]:
    """`KEY:ROLE[,KEY:ROLE...]`; raises ValueError naming the entry's position, never the key."""
    if value is None or not value.get_secret_value().strip():
        return []
    keys = []
    for position, entry in enumerate(value.get_secret_value().split(","), 1):
        key, sep, role = entry.strip().rpartition(":")
        if not sep or not key or role not in ROLE_RANK:
            raise ValueError(f"MERGE_SERVICE_API_KEYS entry {position} is not KEY:ROLE with "
                             f"ROLE one of {', '.join(ROLE_RANK)}")
        if len(key) < 16:
            raise ValueError(f"MERGE_SERVICE_API_KEYS entry {position}: keys must be at least "
                             "16 characters")
        keys.append(ApiKey(key.encode(), Principal(fingerprint(key), role)))
    return keys


_bearer = HTTPBearer(auto_error=False, description="an API key from MERGE_SERVICE_API_KEYS")


def authenticate(keys: list[ApiKey], credentials: HTTPAuthorizationCredentials | None
                 ) -> Principal:
    if not keys:
        return LOCAL
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise Unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    given = credentials.credentials.encode()
    found = None
    for key in keys:  # compare with every key, so the time taken does not tell which matched
        if hmac.compare_digest(given, key.secret):
            found = key.principal
    if found is None:
        raise Unauthorized("unknown API key")
    return found


def optional_principal() -> object:
    """A dependency: the caller's principal, or None for a missing or unknown key (for routes
    that answer everyone and tell more to a known key)."""

    async def dependency(request: Request, credentials: Annotated[
            HTTPAuthorizationCredentials | None, Security(_bearer)]) -> Principal | None:
        try:
            return authenticate(request.app.state.api_keys, credentials)
        except Unauthorized:
            return None

    return Depends(dependency)


def require(role: Role) -> object:
    """A dependency: the caller's principal, if its role is at least `role`."""

    async def dependency(request: Request, credentials: Annotated[
            HTTPAuthorizationCredentials | None, Security(_bearer)]) -> Principal:
        principal = authenticate(request.app.state.api_keys, credentials)
        if not principal.allows(role):
            raise Forbidden(f"this key has role {principal.role!r}; {role!r} is needed")
        return principal

    return Depends(dependency)


def is_loopback(host: str | None) -> bool:
    """`localhost`, an address in 127.0.0.0/8, or ::1 (bracketed or not)."""
    if not host:
        return False
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return (mapped or address).is_loopback


def _host_name(value: str) -> str:
    """The name of a `Host` header value, without the port."""
    return urlsplit(f"//{value}").hostname or ""


class LocalOnly:
    """Local mode (no API key configured): only loopback, same-machine use of the API."""

    unsafe = frozenset({"POST", "PUT", "PATCH", "DELETE"})

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            reason = self._refusal(scope)
            if reason is not None:
                error = Forbidden(f"{reason}; without MERGE_SERVICE_API_KEYS the service is "
                                  "in local mode and serves loopback requests only",
                                  type="LocalModeOnly")
                await JSONResponse(error.body(), status_code=error.status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _refusal(self, scope: dict) -> str | None:
        client = scope.get("client")
        if client and _is_ip(client[0]) and not is_loopback(client[0]):
            return f"requests from {client[0]} are refused"
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        host = _host_name(headers.get("host", ""))
        if not is_loopback(host):
            return f"requests for host {host or '(none)'!r} are refused"
        for name in ("x-forwarded-for", "x-real-ip"):  # a local proxy's client, elsewhere
            forwarded = [v.strip() for v in headers.get(name, "").split(",") if v.strip()]
            if any(not is_loopback(v) for v in forwarded):
                return f"requests forwarded for {forwarded[0]!r} are refused"
        if "forwarded" in headers:
            return "requests through a proxy (Forwarded) are refused"
        origin = headers.get("origin")
        if origin is not None and scope.get("method") in self.unsafe \
                and not is_loopback(urlsplit(origin).hostname):
            return f"writes from pages of origin {origin[:80]!r} are refused"
        return None


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return False
    return True
