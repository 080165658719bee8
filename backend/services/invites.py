"""Single-use sign-up codes (``PREFLOOP_SIGNUP_INVITES``): an admin creates one, a new
annotator spends it at registration. Only the code's SHA-256 is stored, so the table does
not leak usable codes; the code is shown once, when created."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from sqlalchemy import update
from sqlalchemy.orm import Session

from backend.models import Invite
from backend.services.errors import Forbidden


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


def create_invite(session: Session, *, created_by: int | None) -> tuple[Invite, str]:
    """A new invite and its code (shown once)."""
    code = secrets.token_urlsafe(18)
    invite = Invite(code_sha256=_digest(code), created_by=created_by)
    session.add(invite)
    session.flush()
    return invite, code


def spend_invite(session: Session, code: str, *, user_id: int) -> None:
    """Mark the invite with ``code`` used by ``user_id``; :class:`Forbidden` when no unused
    invite has that code. One conditional UPDATE, so two registrations racing for one code
    cannot both win."""
    spent = session.execute(  # type: ignore[attr-defined]  # a CursorResult
        update(Invite)
        .where(Invite.code_sha256 == _digest(code), Invite.used_by.is_(None))
        .values(used_by=user_id, used_at=datetime.now(UTC))
    ).rowcount
    if spent != 1:
        raise Forbidden("invalid or already used invite code")
