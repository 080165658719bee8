from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request, status

from backend.api.deps import SessionDep, StateDep, reads_only
from backend.models import UserStatus
from backend.schemas import LoginForm, Token, UserPublic, UserRegister
from backend.services import users as user_service

router = APIRouter(prefix="/auth", tags=["auth"])


def _client_ip(request: Request) -> str:
    return request.client.host if request.client else "unknown"


@router.post("/token", response_model=Token)
@reads_only
def login(
    request: Request,
    form: Annotated[LoginForm, Form()],
    session: SessionDep,
    state: StateDep,
) -> Token:
    """OAuth2 password flow. Rate limited per username and client IP (429 + Retry-After)."""
    wait = state.login_limiter.hit(f"{form.username.lower()}|{_client_ip(request)}")
    if wait:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail="too many login attempts; try again later",
            headers={"Retry-After": str(wait)},
        )
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
        access_token=state.tokens.issue(user.id, user.role.value),
        expires_in=state.tokens.ttl_seconds,
    )


@router.post("/register", response_model=UserPublic, status_code=status.HTTP_201_CREATED)
def register(body: UserRegister, session: SessionDep, state: StateDep) -> UserPublic:
    """Create an annotator account, when open sign-up is on (403 otherwise, 409 if taken)."""
    if not state.settings.signup_open:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail="sign-up is closed; ask an admin for an account"
        )
    user = user_service.create_user(
        session, state.passwords, username=body.username, password=body.password
    )
    session.commit()
    return UserPublic.model_validate(user)
