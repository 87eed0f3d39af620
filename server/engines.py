"""Wiring from configuration to running source models (engines + tokenizers)."""

from __future__ import annotations

import asyncio
import logging

from fusion.engine import Engine
from fusion.models import SourceModel, build_source_model
from fusion.sources import resolve_source
from server.config import AppConfig, ModelConfig

log = logging.getLogger(__name__)


def make_engine(config: ModelConfig, folder: str) -> Engine:
    """An engine for one model; heavy backends are imported only when used."""
    opts = config.options
    if config.engine == "vllm":
        from fusion.engines.vllm_engine import VllmEngine

        return VllmEngine(config.name, folder, opts.model_dump())
    from fusion.engines.transformers_engine import TransformersEngine

    return TransformersEngine(
        config.name, folder, threads=opts.threads, device=opts.device, dtype=opts.dtype
    )


async def load_models(config: AppConfig) -> list[SourceModel]:
    """Resolve every model's source (converting on first use), start its engine."""
    models: list[SourceModel] = []
    try:
        for mc in config.models:
            folder = await asyncio.to_thread(resolve_source, mc.source)
            engine = make_engine(mc, str(folder))
            models.append(
                build_source_model(
                    mc.name,
                    engine,
                    folder,
                    chat_template=mc.chat_template,
                    stop_strings=mc.stop,
                    step_timeout=mc.step_timeout_seconds,
                )
            )
            await engine.start()
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
