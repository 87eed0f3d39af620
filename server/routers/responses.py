"""``POST /v1/responses``: OpenAI's Responses API, stateless, answered through the chat
path (``server/responses.py`` translates the request, the answer and the stream), admitted,
cancelled and counted as chat is (``answer``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from functools import partial
from typing import Annotated, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.errors import APIError, to_api_error
from server.jobs import Job
from server.responses import Turn, chat_request, renamed
from server.responses_events import Events
from server.responses_protocol import ResponsesRequest
from server.routers.openai import answer
from server.serving import FusionService
from server.state import ServerState, require_key, server_state

router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])
State = Annotated[ServerState, Depends(server_state)]


class _Finishing(Protocol):
    def finish(self, status: str) -> None: ...


@router.post("/responses")
async def create_response(req: ResponsesRequest, request: Request, state: State) -> Response:
    service = state.ready_service()
    turn = Turn(req)
    try:
        job = service.chat_job(chat_request(req))
        events = partial(_events, turn)
        return await answer(
            state, service, job, request, "responses", body=turn.body, stream_events=events
        )
    except APIError as err:
        raise renamed(err) from err


async def _events(
    turn: Turn, service: FusionService, job: Job, admitted: _Finishing
) -> AsyncGenerator[dict[str, str], None]:
    """The Responses events of a streamed turn; after the first byte a failure is one
    ``error`` event, then the stream ends."""
    events = Events(turn, job)
    status = "200"
    try:
        for event in events.start():
            yield event
        async with contextlib.aclosing(service.chunks(job)) as chunks:
            async for chunk in chunks:
                for event in events.feed(chunk):
                    yield event
        for event in events.end():
            yield event
    except (asyncio.CancelledError, GeneratorExit):
        status = "499"  # the client went away; the fusion runs released their engines
        raise
    except Exception as exc:
        err = renamed(to_api_error(exc))
        status = str(err.status)
        yield events.error(err)
    finally:
        admitted.finish(status)
