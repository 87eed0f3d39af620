"""The playground page: static files under ``/playground/``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

PLAYGROUND = Path(__file__).parent.parent / "static" / "playground"

router = APIRouter(include_in_schema=False)


@router.get("/playground")
async def playground_page() -> Response:
    return RedirectResponse("/playground/")


def install(app: FastAPI) -> None:
    """The redirect and the static files (a mount, which a router cannot carry)."""
    app.include_router(router)
    app.mount("/playground/", StaticFiles(directory=PLAYGROUND, html=True), name="playground")
