"""Operations: ``/health``, ``/metrics`` (Prometheus) and ``/v1/fusion/stats``."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from server.state import ServerState, require_key, server_state

router = APIRouter()
State = Annotated[ServerState, Depends(server_state)]


async def _engine_health(state: ServerState) -> dict[str, str]:
    """Ask every engine; record ``fusion_engine_up``; the unhealthy ones with the reason."""
    unhealthy = {}
    for m in state.models:
        try:
            await m.engine.check_health()
            state.metrics.engine_up.labels(m.name).set(1)
        except Exception as exc:
            state.metrics.engine_up.labels(m.name).set(0)
            unhealthy[m.name] = str(exc)
    return unhealthy


@router.get("/health")
async def health(state: State) -> Response:
    if state.service is None:
        why = state.load_error or "loading"
        return JSONResponse({"status": why}, status_code=503)
    unhealthy = await _engine_health(state)
    if unhealthy:
        return JSONResponse({"status": "unhealthy", "engines": unhealthy}, status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/metrics")
async def metrics(state: State) -> Response:
    await _engine_health(state)
    for m in state.models:
        open_states = getattr(m.engine, "open_states", None)
        if open_states is not None:
            state.metrics.open_states.labels(m.name).set(open_states)
        free = getattr(m.engine, "free_sequences", None)
        if free is not None:
            state.metrics.free_sequences.labels(m.name).set(free)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/v1/fusion/stats", dependencies=[Depends(require_key)])
async def fusion_stats(state: State) -> dict[str, Any]:
    """Per source model, over fused segments since start: share won, perplexity, latency."""
    return state.metrics.source_stats()
