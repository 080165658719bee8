"""Typed dependencies: ``SessionDep``, ``CurrentUser``, ``AdminUser``, ``StateDep``.

One session per request. On SQLite it begins with ``BEGIN IMMEDIATE`` when the request may
write (any non-GET method, or a GET endpoint marked with :func:`writes`, like
``/pairs/next``), see :mod:`backend.db`, and such requests pass one at a time through
:meth:`AppState.sqlite_write_gate`.

Authentication: the bearer token's signature and expiry are checked (no database), then the
user row is loaded by primary key in the request's session: banned users get 403 on every
endpoint from the moment the ban commits, and a token older than the row's
``token_version`` (password or role changed, logged out) gets 401.

The annotation hot paths (``GET /pairs/next``, ``POST /votes``) take :data:`BearerClaims`
instead of ``CurrentUser`` + ``SessionDep``: the token is checked in the dependency (401 as
before, no thread, no database), and :func:`run_hot` then runs the user check
(:func:`backend.services.annotation.check_user`: 401 unknown user, 403 banned) *and* the
endpoint's statements on one pooled connection, in one thread-pool hop: one direct call into
:mod:`backend.services.annotation`. To keep the order of errors
exactly as with ``CurrentUser`` (a dependency, so its 401/403 came before a 422 for a bad
body), the dependency leaves its claims in the request scope and the 422 handler
(:mod:`backend.api.errors`) runs the same user check before answering 422.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Path, Query, Request, status
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from backend.api.state import AppState
from backend.db import Database
from backend.models import User, UserRole, UserStatus
from backend.security import InvalidToken, TokenClaims
from backend.services import annotation
from backend.services.errors import ServiceError

F = TypeVar("F", bound=Callable[..., Any])

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/api/v1/auth/token", auto_error=False)

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def writes(fn: F) -> F:
    """Mark a GET endpoint that writes (its SQLite transaction takes the write lock)."""
    fn._prefloop_writes = True  # type: ignore[attr-defined]
    return fn


def reads_only(fn: F) -> F:
    """Mark a non-GET endpoint that never writes (login): a plain read transaction, outside
    the SQLite write gate, so argon2 never runs while holding the write lock."""
    fn._prefloop_writes = False  # type: ignore[attr-defined]
    return fn


async def get_state(request: Request) -> AppState:
    # async: a plain ``def`` dependency costs a thread-pool hop on every request
    return request.app.state.prefloop  # type: ignore[no-any-return]


StateDep = Annotated[AppState, Depends(get_state)]


async def get_session(request: Request, state: StateDep) -> AsyncIterator[Session]:
    endpoint = request.scope.get("endpoint")
    write = getattr(endpoint, "_prefloop_writes", request.method not in _SAFE_METHODS)
    gate = state.sqlite_write_gate() if write and state.db.dialect == "sqlite" else None
    if gate is not None:
        await gate.acquire()
    session = state.db.write_session() if write else state.db.read_session()
    try:
        yield session
    finally:
        try:
            await run_in_threadpool(_close_session, session)
        finally:
            if gate is not None:
                gate.release()


def _close_session(session: Session) -> None:
    """Close ``session`` (its connection goes back to the pool). When the connection died
    with the server (PostgreSQL restarted), its rollback fails: invalidate it instead; the
    response is already decided, and the pool replaces the connection."""
    try:
        session.close()
    except DBAPIError:
        session.invalidate()


SessionDep = Annotated[Session, Depends(get_session)]


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def get_current_user(
    state: StateDep, session: SessionDep, token: Annotated[str | None, Depends(oauth2_scheme)]
) -> User:
    if not token:
        raise _unauthorized("not authenticated")
    try:
        claims = state.tokens.decode(token)
    except InvalidToken:
        raise _unauthorized("invalid or expired token") from None
    user = session.get(User, claims.user_id) if 0 < claims.user_id < 2**31 else None
    if user is None:
        raise _unauthorized("invalid or expired token")
    if user.status == UserStatus.banned:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="account is banned")
    if user.token_version != claims.version:
        raise _unauthorized("invalid or expired token")
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


async def get_admin_user(user: CurrentUser) -> User:
    if user.role != UserRole.admin:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="admin role required")
    return user


AdminUser = Annotated[User, Depends(get_admin_user)]

# --- the hot paths ------------------------------------------------------------------------

#: Where :func:`get_claims` leaves the verified claims for the 422 handler.
CLAIMS_SCOPE_KEY = "prefloop.claims"


async def get_claims(
    request: Request, token: Annotated[str | None, Depends(oauth2_scheme)]
) -> TokenClaims:
    """The bearer token's verified claims (401 without a valid token). The user row is
    checked later, by :mod:`backend.services.annotation`, in the endpoint's transaction."""
    if not token:
        raise _unauthorized("not authenticated")
    try:
        claims = request.app.state.prefloop.tokens.decode(token)
    except InvalidToken:
        raise _unauthorized("invalid or expired token") from None
    request.scope[CLAIMS_SCOPE_KEY] = claims
    return claims


BearerClaims = Annotated[TokenClaims, Depends(get_claims)]


def _run_hot(db: Database, write: bool, fn: Callable[..., Any], args: tuple) -> Any:
    with db.hot_connection(write=write) as conn:
        return fn(conn, *args)


async def run_hot(state: AppState, fn: Callable[..., Any], *args: Any, write: bool = True) -> Any:
    """``fn(conn, *args)``, ``fn`` being one of :mod:`backend.services.annotation`'s calls
    (which makes the user check itself), on one pooled
    :meth:`~backend.db.Database.hot_connection` (PostgreSQL: autocommit statements; SQLite:
    one transaction), in one hop to the database's thread pool. When it returns, whatever
    ``fn`` wrote is committed. On SQLite, writes pass the write gate as in
    :func:`get_session`."""
    gate = state.sqlite_write_gate() if write and state.db.dialect == "sqlite" else None
    if gate is not None:
        await gate.acquire()
    try:
        return await state.db.run(_run_hot, state.db, write, fn, args)
    finally:
        if gate is not None:
            gate.release()


async def recheck_user_before_422(request: Request) -> HTTPException | None:
    """For the 422 handler: when a hot-path endpoint's dependencies ran (its claims are in
    the scope), the 401 / 403 of the user check, which ``CurrentUser`` would have raised
    before the body was validated; else None."""
    claims = request.scope.get(CLAIMS_SCOPE_KEY)
    if claims is None:
        return None
    state: AppState = request.app.state.prefloop

    def check() -> None:
        with state.db.engine.connect() as conn:
            annotation.check_user(conn, claims)

    try:
        await state.db.run(check)
    except ServiceError as exc:
        return HTTPException(exc.status_code, detail=exc.detail, headers=exc.headers)
    return None


MAX_ID = 2**31 - 1
IdPath = Annotated[int, Path(ge=1, le=MAX_ID)]
Offset = Annotated[int, Query(ge=0, le=MAX_ID)]
Limit = Annotated[int, Query(ge=1, le=500)]
