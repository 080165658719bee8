"""Passwords (argon2id) and access tokens (HS256 JWT).

argon2 runs only at login, registration and user creation. A request is authenticated by
verifying the token's HMAC (microseconds) and then loading the user by primary key (one
indexed lookup), which is where bans and role changes take effect, immediately and without
a cache that could go stale. The token carries the user id (``sub``) and role for clients;
the server trusts the database row, not the role claim. It also carries the user's
``token_version`` (``ver``) at issue time: a password change, a role change, a ban or a
logout bumps the row's version, and every token issued before stops working (401).

Decoding is cached per token string (:class:`TokenService`): a token's claims never change
(same string, same key), so a hit only re-checks the expiry against the clock. Only the
decode is cached: the user row, so bans and role changes, is still read on every request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

ALGORITHM = "HS256"

#: Stored for accounts that cannot log in (e.g. annotators created by a dataset import).
UNUSABLE_PASSWORD = "!"


class PasswordService:
    def __init__(self, *, time_cost: int = 3, memory_kib: int = 65536) -> None:
        self._hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib)
        self._dummy_hash: str | None = None

    def burn(self, password: str) -> None:
        """Verify against a throwaway hash: a login for an unknown username then costs the
        same as one with a wrong password, so timing does not reveal which names exist."""
        if self._dummy_hash is None:
            self._dummy_hash = self._hasher.hash("prefloop-dummy-password")
        self.verify(self._dummy_hash, password)

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, password_hash: str, password: str) -> bool:
        if password_hash == UNUSABLE_PASSWORD:
            return False
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False


@dataclass(frozen=True)
class TokenClaims:
    user_id: int
    role: str
    expires_at: int
    version: int = 0


class InvalidToken(Exception):
    pass


class TokenService:
    #: Decoded tokens kept; the cache is emptied when full (each annotator's client reuses
    #: one token for hours, so this holds every active one).
    CACHE_SIZE = 8192

    def __init__(self, secret: str, ttl_seconds: int) -> None:
        self._secret = secret
        self.ttl_seconds = ttl_seconds
        self._cache: dict[str, TokenClaims] = {}

    def issue(self, user_id: int, role: str, version: int = 0) -> str:
        """A token for the user at ``version`` (the row's ``token_version``)."""
        now = int(time.time())
        payload = {
            "sub": str(user_id),
            "role": role,
            "ver": version,
            "iat": now,
            "exp": now + self.ttl_seconds,
        }
        return jwt.encode(payload, self._secret, algorithm=ALGORITHM)

    def decode(self, token: str) -> TokenClaims:
        """The verified claims of ``token``; :class:`InvalidToken` when its signature, shape
        or expiry is wrong. Only valid tokens are cached, and a cached one is re-checked
        against ``exp`` (PyJWT's rule: expired once ``exp <= now``)."""
        claims = self._cache.get(token)
        if claims is not None:
            if claims.expires_at > time.time():
                return claims
            self._cache.pop(token, None)
            raise InvalidToken("Signature has expired")
        claims = self._decode(token)
        if len(self._cache) >= self.CACHE_SIZE:
            self._cache.clear()
        self._cache[token] = claims
        return claims

    def _decode(self, token: str) -> TokenClaims:
        try:
            payload = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]}
            )
            return TokenClaims(
                user_id=int(payload["sub"]),
                role=str(payload.get("role", "")),
                expires_at=int(payload["exp"]),
                version=int(payload.get("ver", 0)),
            )
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise InvalidToken(str(exc)) from exc
