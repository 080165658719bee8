from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, Response, status

from backend.api.deps import AdminUser, CurrentUser, SessionDep, StateDep, reads_only
from backend.api.openapi import READS_ONLY
from backend.models import UserStatus
from backend.rate_limit import Limiter
from backend.schemas import InvitePublic, LoginForm, Token, UserPublic, UserRegister
from backend.services import invites as invite_service
from backend.services import users as user_service

router = APIRouter(prefix="/auth", tags=["auth"])


def client_ip(request: Request) -> str:
    """The client's address. Behind a reverse proxy it is the one ``X-Forwarded-For`` names
    only when the proxy is in ``PREFLOOP_TRUSTED_PROXIES`` (the server resolves it; see
    ``prefloop serve``), never a header that any client can send."""
    return request.client.host if request.client else "unknown"


def _limit(limiter: Limiter, key: str, what: str) -> None:
    wait = limiter.hit(key)
    if wait:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail=f"too many {what}; try again later",
            headers={"Retry-After": str(wait)},
        )


@router.post(
    "/token",
    response_model=Token,
    openapi_extra={READS_ONLY: True},
    responses={
        401: {"description": "Incorrect username or password."},
        403: {"description": "The account is banned."},
        429: {"description": "Too many attempts for this username and address."},
    },
)
@reads_only
def login(
    request: Request,
    form: Annotated[LoginForm, Form()],
    session: SessionDep,
    state: StateDep,
) -> Token:
    """OAuth2 password flow. Rate limited per username and client IP (429 + Retry-After),
    across every API process when ``PREFLOOP_RATE_LIMIT_REDIS_URL`` is set."""
    _limit(state.login_limiter, f"{form.username.lower()}|{client_ip(request)}", "login attempts")
    user = user_service.get_by_username(session, form.username)
    if user is None:
        state.passwords.burn(form.password)
        ok = False
    else:
        ok = state.passwords.verify(user.password_hash, form.password)
    if not ok or user is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="incorrect username or password",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if user.status == UserStatus.banned:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="account is banned")
    return Token(
        access_token=state.tokens.issue(user.id, user.role.value, user.token_version),
        expires_in=state.tokens.ttl_seconds,
    )


@router.post("/logout", status_code=status.HTTP_204_NO_CONTENT, response_class=Response)
def logout(user: CurrentUser, session: SessionDep) -> Response:
    """End every session of the caller: all tokens issued to them so far stop working."""
    user_service.end_sessions(user)
    session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/register",
    response_model=UserPublic,
    status_code=status.HTTP_201_CREATED,
    responses={
        403: {"description": "Sign-up is closed, or the invite code is missing or spent."},
        409: {"description": "The username is taken."},
        429: {"description": "Too many registrations from this address."},
    },
)
def register(
    request: Request, body: UserRegister, session: SessionDep, state: StateDep
) -> UserPublic:
    """Create an annotator account, when open sign-up is on (403 otherwise, 409 if taken).
    With ``PREFLOOP_SIGNUP_INVITES`` it also spends a single-use ``invite_code`` (403 when
    missing, unknown or used). Rate limited per client IP (429 + Retry-After)."""
    settings = state.settings
    if not settings.signup_open:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail="sign-up is closed; ask an admin for an account"
        )
    _limit(state.register_limiter, client_ip(request), "registrations from this address")
    if settings.signup_invites and not body.invite_code:
        raise HTTPException(status.HTTP_403_FORBIDDEN, detail="sign-up needs an invite code")
    user = user_service.create_user(
        session, state.passwords, username=body.username, password=body.password
    )
    if settings.signup_invites:
        assert body.invite_code is not None
        invite_service.spend_invite(session, body.invite_code, user_id=user.id)
    session.commit()
    return UserPublic.model_validate(user)


@router.post("/invites", response_model=InvitePublic, status_code=status.HTTP_201_CREATED)
def create_invite(session: SessionDep, admin: AdminUser) -> InvitePublic:
    """A single-use sign-up code (for ``PREFLOOP_SIGNUP_INVITES``), shown once."""
    invite, code = invite_service.create_invite(session, created_by=admin.id)
    session.commit()
    return InvitePublic(id=invite.id, code=code, created_at=invite.created_at)
