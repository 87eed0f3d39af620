"""Wiring from configuration to running source models (engines + tokenizers)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fusion.models import SourceModel, build_source_model
from server.config import AppConfig
from server.engine_registry import build, plan

log = logging.getLogger(__name__)


def template_text(template: str | None) -> str | None:
    """A chat template given as the template or, as vLLM takes it, a path to a file."""
    if template and "{" not in template and Path(template).expanduser().is_file():
        return Path(template).expanduser().read_text()
    return template


async def load_models(config: AppConfig) -> list[SourceModel]:
    """Resolve every model's source (converting on first use), build and start its engine
    (the kind from the registry; ``auto`` resolved and logged with its reason)."""
    models: list[SourceModel] = []
    planned = await asyncio.to_thread(plan, list(config.models))
    try:
        for p in planned:
            mc = p.config
            built = await asyncio.to_thread(build, p)
            # a tokenizer without tokenizer.json loads through transformers (seconds)
            models.append(
                await asyncio.to_thread(
                    build_source_model,
                    mc.name,
                    built.engine,
                    built.tokenizer_dir,
                    chat_template=template_text(mc.chat_template),
                    stop_strings=mc.stop,
                    step_timeout=mc.step_timeout_seconds,
                    trust_remote_code=mc.trust_remote_code,
                )
            )
            await built.engine.start()
    except BaseException:
        await shutdown_models(models)
        raise
    return [
        SourceModel(**{**m.__dict__, "max_model_len": getattr(m.engine, "max_model_len", 0)})
        for m in models
    ]


async def shutdown_models(models: list[SourceModel]) -> None:
    for m in models:
        try:
            await m.engine.shutdown()
        except Exception:
            log.warning("shutting down %s failed", m.name, exc_info=True)
