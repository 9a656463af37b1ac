"""Bearer API keys with roles `read` < `submit` < `admin` (DESIGN.md section 4).

`MERGE_SERVICE_API_KEYS="key1:admin,key2:read"`. With no key configured the API is in local
mode: every request is allowed, and `merge-service api`/`up` refuse to bind anything but a
loopback address. Keys are compared in constant time and never logged or returned; a key is
known elsewhere only by its fingerprint (a truncated sha256).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated, Literal

from fastapi import Depends, Request, Security
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


def require(role: Role) -> object:
    """A dependency: the caller's principal, if its role is at least `role`."""

    async def dependency(request: Request, credentials: Annotated[
            HTTPAuthorizationCredentials | None, Security(_bearer)]) -> Principal:
        principal = authenticate(request.app.state.api_keys, credentials)
        if not principal.allows(role):
            raise Forbidden(f"this key has role {principal.role!r}; {role!r} is needed")
        return principal

    return Depends(dependency)
