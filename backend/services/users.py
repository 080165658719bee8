"""Accounts: creation, lookup, bans and caps, the bootstrap admin, annotator statistics."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from backend.models import PairAssignment, User, UserRole, UserStatus, Vote
from backend.security import PasswordService
from backend.services.errors import Conflict, NotFound
from backend.services.quality import AnnotatorQuality, quality_report
from backend.settings import Settings

log = logging.getLogger(__name__)


def get_user(session: Session, user_id: int) -> User:
    user = session.get(User, user_id)
    if user is None:
        raise NotFound(f"user {user_id} not found")
    return user


def get_by_username(session: Session, username: str) -> User | None:
    return session.scalars(select(User).where(User.username == username)).first()


def create_user(
    session: Session,
    passwords: PasswordService,
    *,
    username: str,
    password: str | None,
    role: UserRole = UserRole.annotator,
    daily_cap: int | None = None,
    weekly_cap: int | None = None,
    password_hash: str | None = None,
) -> User:
    """Create an account (409 on a taken username). Concurrent duplicates lose on the unique
    constraint at flush, which the API also maps to 409."""
    if get_by_username(session, username) is not None:
        raise Conflict(f"username {username!r} is taken")
    if password_hash is None:
        if password is None:
            raise ValueError("password or password_hash is required")
        password_hash = passwords.hash(password)
    user = User(
        username=username,
        password_hash=password_hash,
        role=role,
        status=UserStatus.active,
        daily_cap=daily_cap,
        weekly_cap=weekly_cap,
    )
    session.add(user)
    session.flush()
    return user


def update_user(
    session: Session,
    passwords: PasswordService,
    user_id: int,
    *,
    acting_user_id: int,
    changes: dict[str, Any],
) -> User:
    """Apply ``changes`` (status, role, daily_cap, weekly_cap, password). Status: ``active``
    (unban), ``banned`` (no access; votes never train or count), ``shadow_banned`` (keeps
    voting, unaware; the votes never train or count: every training, A/B, ranking and
    agreement query takes active annotators only). An admin cannot ban, shadow-ban or demote
    themself (that could lock every admin out). A new password, a new role or a ban ends the
    user's sessions (:func:`end_sessions`)."""
    user = get_user(session, user_id)
    if user_id == acting_user_id and (
        changes.get("status") in (UserStatus.banned, UserStatus.shadow_banned)
        or changes.get("role") == UserRole.annotator
    ):
        raise Conflict("you cannot ban, shadow-ban or demote yourself")
    ends_sessions = (
        changes.get("password") is not None
        or ("role" in changes and changes["role"] != user.role)
        or (changes.get("status") == UserStatus.banned and user.status != UserStatus.banned)
    )
    for key in ("status", "role", "daily_cap", "weekly_cap"):
        if key in changes:
            setattr(user, key, changes[key])
    if changes.get("password") is not None:
        user.password_hash = passwords.hash(changes["password"])
    if ends_sessions:
        end_sessions(user)
    session.flush()
    return user


def end_sessions(user: User) -> None:
    """Invalidate every token issued to ``user`` so far (logout, password or role change,
    ban): tokens carry the ``token_version`` they were issued at."""
    user.token_version = (user.token_version or 0) + 1


def ensure_admin(session: Session, settings: Settings, passwords: PasswordService) -> str | None:
    """Make sure the configured admin account exists, is an active admin and has the
    configured password. Returns the generated password when one had to be made (local mode,
    no password configured, first start): the caller prints it once."""
    configured = settings.admin_password.get_secret_value() if settings.admin_password else None
    user = get_by_username(session, settings.admin_username)
    if user is None:
        generated = None
        if configured is None:
            settings.require_server_secrets()  # non-local mode: a configured password is required
            generated = secrets.token_urlsafe(12)
        session.add(
            User(
                username=settings.admin_username,
                password_hash=passwords.hash(configured or generated or ""),
                role=UserRole.admin,
                status=UserStatus.active,
            )
        )
        session.flush()
        return generated
    if user.role != UserRole.admin:
        end_sessions(user)
    user.role = UserRole.admin
    user.status = UserStatus.active
    if configured is not None and not passwords.verify(user.password_hash, configured):
        user.password_hash = passwords.hash(configured)
        end_sessions(user)
    session.flush()
    return None


@dataclass
class UserStats:
    user: User
    votes: int
    votes_today: int
    served: int
    quality: AnnotatorQuality | None


def list_users_with_stats(
    session: Session, settings: Settings, *, offset: int, limit: int, since: Any
) -> tuple[list[UserStats], int]:
    """A page of users with volume, and reliability, agreement and flags from the cached
    :func:`backend.services.quality.quality_report` (computed once per data version, not per
    page)."""
    total = session.scalar(select(func.count()).select_from(User)) or 0
    users = list(session.scalars(select(User).order_by(User.id).offset(offset).limit(limit)))
    if not users:
        return [], total
    ids = [u.id for u in users]
    volume = {
        row.user_id: row
        for row in session.execute(
            select(
                Vote.user_id,
                func.count().label("votes"),
                func.coalesce(func.sum(case((Vote.created_at >= since, 1), else_=0)), 0).label(
                    "today"
                ),
            )
            .where(Vote.user_id.in_(ids))
            .group_by(Vote.user_id)
        )
    }
    served = dict(
        session.execute(
            select(PairAssignment.user_id, func.count())
            .where(PairAssignment.user_id.in_(ids))
            .group_by(PairAssignment.user_id)
        ).all()
    )
    report = quality_report(session, settings)
    out = []
    for u in users:
        v = volume.get(u.id)
        out.append(
            UserStats(
                user=u,
                votes=int(v.votes) if v else 0,
                votes_today=int(v.today) if v else 0,
                served=int(served.get(u.id, 0)),
                quality=report.annotators.get(u.id),
            )
        )
    return out, total
