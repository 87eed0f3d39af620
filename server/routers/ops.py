"""Operations: ``/health`` (readiness), ``/live`` (liveness), ``/metrics`` (Prometheus)
and ``/v1/fusion/stats``.

``/health`` is vLLM's readiness endpoint: whether to send this server traffic; ``/live``
(ours; vLLM has none) only whether the process answers HTTP (restarting it would not mend a source
model's engine, least of all a remote vLLM server). ``/health`` answers 200 while every
fused model name (the fused model and each of its variants) can answer, that is while at
least one of its source models' engines is up; a single source model's name answering
or not is reported but does not take the server out of service. Every engine is asked
at once, each for at most ``ServerState.health_timeout_seconds``; one that does not
answer in time counts as down. The body is written down in ``docs/DEPLOYMENT.md``
("Probes").
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response

from fusion.models import SourceModel
from server.serving import FusionService
from server.state import ServerState, require_key, server_state

router = APIRouter()
State = Annotated[ServerState, Depends(server_state)]


def _why_down(check: asyncio.Future[None], timeout: float) -> str | None:
    """None if a finished ``check_health`` passed, else why its engine counts as down."""
    if not check.done():
        return f"check_health did not answer within {timeout:g} s"
    if check.cancelled():
        return "check_health was cancelled"
    exc = check.exception()
    return None if exc is None else str(exc) or type(exc).__name__


def _forget(check: asyncio.Future[None]) -> None:
    """Retrieve a late check's outcome, so asyncio does not log it as never retrieved."""
    if not check.cancelled():
        check.exception()


async def check_engines(models: Sequence[SourceModel], timeout: float) -> dict[str, str | None]:
    """Every engine's ``check_health`` at once, each within ``timeout`` seconds: per source
    model None when it is up, else why it is down."""
    checks = {m.name: asyncio.ensure_future(m.engine.check_health()) for m in models}
    try:
        if checks:
            await asyncio.wait(checks.values(), timeout=timeout)
        return {name: _why_down(check, timeout) for name, check in checks.items()}
    finally:
        # not awaited: a hung check may ignore the cancel, and /health must answer anyway
        for check in checks.values():
            if not check.done():
                check.cancel()
                check.add_done_callback(_forget)


def served_sources(service: FusionService) -> tuple[dict[str, list[str]], list[str]]:
    """Each served model name with the source models it runs on, and the fused names among
    them, as ``/v1/models`` lists them (so a variant's models are resolved in one place)."""
    cards = service.model_cards()
    sources = {c["id"]: list(c["fusion"]["sources"]) if "fusion" in c else [c["id"]] for c in cards}
    return sources, [c["id"] for c in cards if "fusion" in c]


def readiness(
    engines: Mapping[str, str | None], sources: Mapping[str, Sequence[str]], fused: Sequence[str]
) -> tuple[str, dict[str, bool]]:
    """The status ("ok", "degraded" or "unavailable") and whether each served name can
    answer: a name can while one of its source models' engines is up."""
    up = {name for name, why in engines.items() if why is None}
    models = {name: any(s in up for s in members) for name, members in sources.items()}
    if not all(models[name] for name in fused):
        return "unavailable", models
    return ("ok" if len(up) == len(engines) else "degraded"), models


async def _health(state: ServerState) -> tuple[int, dict[str, Any]]:
    """``/health``'s status code and body; records ``fusion_engine_up``,
    ``fusion_model_state`` and ``fusion_model_available`` on the way. An engine whose
    check fails is ejected (its probe brings it back); an ejected one is not checked."""
    if state.service is None:
        loading = {m.name: {"state": "loading"} for m in state.config.models}
        state.metrics.member_states({n: "loading" for n in loading})
        if state.load_error:
            return 503, {"status": "failed", "error": state.load_error, "engines": loading}
        return 503, {"status": "loading", "engines": loading}
    members = state.service.fuser.members
    up = [m for m in state.models if members.health[m.name].ejection is None]
    asked = time.monotonic()
    for name, why in (await check_engines(up, state.health_timeout_seconds)).items():
        if why is not None:
            members.fault(name, f"health check: {why}", since=asked)
    report = members.report()
    engines = {n: None if r["state"] == "up" else str(r["error"]) for n, r in report.items()}
    status, models = readiness(engines, *served_sources(state.service))
    state.metrics.availability({n: why is None for n, why in engines.items()}, models)
    state.metrics.member_states({n: str(r["state"]) for n, r in report.items()})
    body = {"status": status, "engines": report, "models": models}
    return (503 if status == "unavailable" else 200), body


@router.get("/health")
async def health(state: State) -> Response:
    """Readiness: 200 while every fused model name can answer, else 503."""
    code, body = await _health(state)
    return JSONResponse(body, status_code=code)


@router.get("/live")
async def live() -> dict[str, str]:
    """Liveness: 200 whenever the process answers HTTP (asks no engine, also while loading)."""
    return {"status": "alive"}


@router.get("/metrics")
async def metrics(state: State) -> Response:
    await _health(state)
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
