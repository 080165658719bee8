"""The A/B decision, checked right after each A/B vote, off the request path.

``POST /votes`` stores the vote (its 2xx means it is committed) and, when the pair was an A/B
pair, leaves :func:`check_after_vote` to run after the response is sent (a Starlette
background task): vote latency does not change. The check (:func:`backend.services.publishing.
check_test`) replays the test's votes, and on its first decision records it and applies the
publish policy in one transaction.

Checks of one test are coalesced per process: while one runs, further votes only ask for one
more pass after it. Several processes may check the same test at once: the decision is
recorded by a conditional update, so exactly one of them records and acts. A check that fails
(the database is busy) is logged; the periodic ``ab.check`` task finds the test again.
"""

from __future__ import annotations

import logging

from backend.api.state import AppState
from backend.services import publishing

log = logging.getLogger(__name__)


def _check(state: AppState, test_id: int) -> None:
    with state.db.transaction() as session:
        result = publishing.check_test(session, test_id, state.settings)
    if result is not None:
        log.info(
            "A/B %s of version %s decided: %s (%s)",
            result.phase,
            result.version_id,
            result.state,
            result.action,
        )


async def check_after_vote(state: AppState, test_id: int) -> None:
    if test_id in state.ab_checking:
        state.ab_recheck.add(test_id)
        return
    state.ab_checking.add(test_id)
    try:
        while True:
            state.ab_recheck.discard(test_id)
            gate = state.sqlite_write_gate() if state.db.dialect == "sqlite" else None
            if gate is not None:
                await gate.acquire()
            try:
                await state.db.run(_check, state, test_id)
            except Exception:  # noqa: BLE001 - the periodic ab.check task catches up
                log.exception("checking A/B test %s failed; ab.check will retry", test_id)
                return
            finally:
                if gate is not None:
                    gate.release()
            if test_id not in state.ab_recheck:
                return
    finally:
        state.ab_checking.discard(test_id)
