"""``/healthz`` (database ping) and ``/metrics`` (Prometheus), outside ``/api/v1``."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from backend.api.deps import StateDep
from backend.observability import LoopStateCollector, render_metrics
from backend.schemas import Health

router = APIRouter(tags=["ops"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(state: StateDep) -> Health | JSONResponse:
    try:
        with state.db.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception:  # noqa: BLE001 - any failure means "not healthy"
        return JSONResponse({"status": "error", "database": "unreachable"}, status_code=503)
    return Health(status="ok", database="ok")


@router.get("/metrics", response_class=Response)
def metrics(state: StateDep) -> Response:
    """This process's request metrics (all server processes' in multiprocess mode) and the
    loop's state, read now from the database and the broker."""
    body, content_type = render_metrics(
        state.metrics, LoopStateCollector(state.db.read_session, state.settings)
    )
    return Response(body, media_type=content_type)
