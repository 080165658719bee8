"""Files written inside a database transaction live or die with it.

The one mechanism for "a refused request leaves nothing behind": a service that writes a file
as part of a transaction (an image of a dataset import, of the pair pool) calls
:func:`track_new_file` with the store and key of the file it *created* (content-addressed
files that already existed are not tracked), on local disk or object storage alike. When the session's transaction commits, the list is forgotten; when
it ends any other way (rollback, an exception, a session closed without commit), each tracked
file is deleted, unless a committed row refers to it by then (a concurrent request that
stored the same bytes).

Rows need nothing more: handlers write in one transaction and commit last, so a refusal rolls
them back. :func:`install` hooks the events on a session factory (:class:`backend.db.Database`
does it for its read and write sessions).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from sqlalchemy import event, select
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker

log = logging.getLogger(__name__)

_KEY = "prefloop.new_files"

#: ``(session, relative_path) -> bool``: does a committed row refer to this file?
Referenced = Callable[[Session, str], bool]


class Deletes(Protocol):
    """Where a tracked file lives: :class:`backend.storage.ImageStore` (or any store)."""

    def delete(self, rel: str) -> bool: ...


def track_new_file(session: Session, store: Deletes, rel: str) -> None:
    """Delete ``rel`` from ``store`` unless ``session``'s transaction commits."""
    session.info.setdefault(_KEY, []).append((store, rel))


def pending_files(session: Session) -> list[str]:
    """The keys of the files that the current transaction created and has not committed."""
    return [rel for _, rel in session.info.get(_KEY, [])]


def _image_referenced(session: Session, rel: str) -> bool:
    from backend.models import Image

    engine = session.get_bind().engine
    with engine.connect() as conn:  # a fresh connection: only committed rows count
        return (
            conn.execute(select(Image.id).where(Image.storage_path == rel).limit(1)).first()
            is not None
        )


def discard(session: Session, referenced: Referenced = _image_referenced) -> int:
    """Delete the tracked files of ``session`` (its transaction did not commit); returns how
    many were removed."""
    removed = 0
    for store, rel in session.info.pop(_KEY, []):
        try:
            if referenced(session, rel):
                continue
        except Exception:  # noqa: BLE001 - database down: the file is harmless, keep it
            log.warning("kept %s: cannot check whether a committed row refers to it", rel)
            continue
        try:
            if store.delete(rel):
                removed += 1
        except Exception:  # noqa: BLE001 - storage down: an unreferenced file is harmless
            log.warning("kept %s: cannot delete it", rel, exc_info=True)
    return removed


def _after_commit(session: Session) -> None:
    session.info.pop(_KEY, None)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.parent is None and session.info.get(_KEY):
        discard(session)


def install(factory: sessionmaker[Session]) -> None:
    """Make every session of ``factory`` delete its uncommitted files."""
    event.listen(factory, "after_commit", _after_commit)
    event.listen(factory, "after_transaction_end", _after_transaction_end)
