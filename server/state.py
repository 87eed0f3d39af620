"""What one app instance shares between its routes: config, metrics, models, admission.

``create_app`` builds one ``ServerState`` and puts it on ``app.state.fusion``; routes get
it through the ``server_state`` dependency (no module-level state).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Request

from fusion.models import SourceModel
from server.admission import Admission
from server.config import AppConfig
from server.errors import Unauthorized, Unavailable
from server.metrics import Metrics
from server.serving import FusionService


@dataclass
class ServerState:
    config: AppConfig
    admission: Admission
    metrics: Metrics
    api_keys: list[str] = field(default_factory=list)
    service: FusionService | None = None
    models: list[SourceModel] = field(default_factory=list)
    load_error: str | None = None
    # the longest /health waits for one engine's check_health (they run at once); below
    # an orchestrator's probe timeout, so a hung engine is reported down, not the server
    health_timeout_seconds: float = 5.0
    # called when loading the models fails (``serve`` stops the process, as vLLM does:
    # an orchestrator sees the failed start; tests leave it unset and read /health)
    on_load_error: Callable[[], None] | None = None

    def ready_service(self) -> FusionService:
        if self.service is None:
            why = self.load_error or "the source models are still loading"
            raise Unavailable(f"service unavailable: {why}", retry_after=10)
        return self.service


def server_state(request: Request) -> ServerState:
    """The app's state (a FastAPI dependency)."""
    state: ServerState = request.app.state.fusion
    return state


def require_key(request: Request) -> None:
    """Bearer-key check for ``/v1`` (a FastAPI dependency); open when no key is set."""
    keys = server_state(request).api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    given = token.strip().encode() if scheme.lower() == "bearer" else b""
    # compare against every key, always, so timing says nothing about which matched
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given, key.encode())
    if not ok:
        raise Unauthorized("invalid or missing API key (Authorization: Bearer <key>)")
