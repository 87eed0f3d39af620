"""Probes for orchestrators (issue 22 item 7): ``/health`` is readiness and stays 200
while every fused model name can answer; ``/live`` is liveness and asks no engine.

In-process HTTP against the real app; only engines' ``check_health`` is scripted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from server.app import create_app
from server.config import load_config
from tests.conftest import DEFAULT_SOURCES
from tests.server.test_api import CHAT, samples

SMOL, GEMMA, QWEN = "smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"


async def died() -> None:
    raise RuntimeError("engine process died")


def config(**fusion: object):
    """The three default source models; ``fusion``: the fused model's settings."""
    models = [{"name": name, "source": src} for name, src in DEFAULT_SOURCES.items()]
    return load_config(None, models=models, fusion=fusion)


@asynccontextmanager
async def serve(app) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        yield http


def gauges(text: str, name: str, label: str) -> dict[str, float]:
    return {labels[label]: value for labels, value in samples(text, name)}


async def test_all_engines_up_is_200_ok_with_every_engine_and_model_listed(trio):
    async with serve(create_app(config(), models=trio())) as http:
        r = await http.get("/health")
        metrics = (await http.get("/metrics")).text
    assert r.status_code == 200
    assert r.json() == {
        "status": "ok",
        "engines": {SMOL: {"state": "up"}, GEMMA: {"state": "up"}, QWEN: {"state": "up"}},
        "models": {"fusion": True, SMOL: True, GEMMA: True, QWEN: True},
    }
    assert gauges(metrics, "fusion_engine_up", "source") == {SMOL: 1, GEMMA: 1, QWEN: 1}
    available = gauges(metrics, "fusion_model_available", "model")
    assert available == {"fusion": 1, SMOL: 1, GEMMA: 1, QWEN: 1}


async def test_one_member_of_three_down_keeps_health_200_and_lists_it_down(trio):
    """Regression: one engine down made ``/health`` 503, so a readiness probe took a
    server out of service whose fused model still answered."""
    models = trio()
    models[0].engine.check_health = died
    async with serve(create_app(config(), models=models)) as http:
        r = await http.get("/health")
        metrics = (await http.get("/metrics")).text
        chat = await http.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "degraded"
    ejected = body["engines"][SMOL]
    assert ejected["state"] == "ejected" and ejected["since"] <= time.time()
    assert ejected["error"] == "health check: engine process died"
    assert 0 <= ejected["retry_in"] <= 1.0  # its first ejection: the probe is due soon
    assert body["engines"][GEMMA] == body["engines"][QWEN] == {"state": "up"}
    assert body["models"] == {"fusion": True, SMOL: False, GEMMA: True, QWEN: True}
    assert gauges(metrics, "fusion_engine_up", "source") == {SMOL: 0, GEMMA: 1, QWEN: 1}
    states = {(lb["source"], lb["state"]): v for lb, v in samples(metrics, "fusion_model_state")}
    assert states[(SMOL, "ejected")] == 1 and states[(SMOL, "up")] == 0
    assert states[(GEMMA, "up")] == 1
    assert gauges(metrics, "fusion_model_available", "model")[SMOL] == 0
    assert gauges(metrics, "fusion_model_available", "model")["fusion"] == 1
    assert chat.status_code == 200  # the fused model does answer, without it
    assert chat.json()["usage"]["models"][SMOL]["dropped"].startswith("ejected since")


async def test_all_members_of_the_fused_model_down_is_503(trio):
    """The fused model runs on SmolLM2 and Gemma, its variant on Qwen alone: with both of
    the fused model's engines down it cannot answer, though Qwen is up."""
    models = trio()
    models[0].engine.check_health = died
    models[1].engine.check_health = died
    cfg = config(models=[SMOL, GEMMA], variants={"fusion-qwen": {"models": [QWEN]}})
    async with serve(create_app(cfg, models=models)) as http:
        r = await http.get("/health")
        metrics = (await http.get("/metrics")).text
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["models"] == {
        "fusion": False,
        "fusion-qwen": True,
        SMOL: False,
        GEMMA: False,
        QWEN: True,
    }
    assert body["engines"][QWEN] == {"state": "up"}
    assert gauges(metrics, "fusion_model_available", "model")["fusion"] == 0


async def test_a_variant_answers_on_its_own_members_only(trio):
    """A variant's members are its own ``models``, not the fused model's: Qwen down takes
    down the Qwen-only variant (503) though the fused model still answers."""
    models = trio()
    models[2].engine.check_health = died
    cfg = config(models=[SMOL, GEMMA], variants={"fusion-qwen": {"models": [QWEN]}})
    async with serve(create_app(cfg, models=models)) as http:
        r = await http.get("/health")
    assert r.status_code == 503
    assert r.json()["models"]["fusion"] is True
    assert r.json()["models"]["fusion-qwen"] is False


async def test_a_hung_check_health_is_down_within_the_timeout(trio):
    cancelled = asyncio.Event()

    async def hangs() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    models = trio()
    models[1].engine.check_health = hangs
    app = create_app(config(), models=models)
    app.state.fusion.health_timeout_seconds = 0.2
    async with serve(app) as http:
        started = time.monotonic()
        r = await http.get("/health")
        elapsed = time.monotonic() - started
    assert elapsed < 3  # the hang lasts forever; the answer comes after the 0.2 s bound
    assert r.status_code == 200
    assert r.json()["engines"][GEMMA]["state"] == "ejected"
    assert r.json()["engines"][GEMMA]["error"] == (
        "health check: check_health did not answer within 0.2 s"
    )
    assert r.json()["models"][GEMMA] is False and r.json()["models"]["fusion"] is True
    await asyncio.wait_for(cancelled.wait(), 1)  # the hung check is not left running


async def test_engines_are_checked_concurrently(trio):
    """Each check passes only once all three have started: checked one after another,
    the first would wait out its timeout (and count as down, or at least make the answer
    that late)."""
    models = trio()
    started: set[str] = set()
    everyone = asyncio.Event()

    def meets_the_others(name: str):
        async def check() -> None:
            started.add(name)
            if len(started) == len(models):
                everyone.set()
            await everyone.wait()

        return check

    for m in models:
        m.engine.check_health = meets_the_others(m.name)
    app = create_app(config(), models=models)
    app.state.fusion.health_timeout_seconds = 3.0
    async with serve(app) as http:
        started_at = time.monotonic()
        r = await http.get("/health")
        elapsed = time.monotonic() - started_at
    assert r.status_code == 200
    assert r.json()["status"] == "ok", r.json()
    assert elapsed < 2  # concurrent checks meet at once; one after another take 3 s


async def test_loading_is_503_and_live_is_200_meanwhile(trio):
    # no lifespan run: the configured models never start loading, as in the first
    # seconds (or minutes) of a real start
    app = create_app(config())
    async with serve(app) as http:
        health = await http.get("/health")
        live = await http.get("/live")
        metrics = await http.get("/metrics")
    assert health.status_code == 503
    loading = {"state": "loading"}
    assert health.json() == {
        "status": "loading",
        "engines": {SMOL: loading, GEMMA: loading, QWEN: loading},
    }
    assert live.status_code == 200 and live.json() == {"status": "alive"}
    assert metrics.status_code == 200
    assert not samples(metrics.text, "fusion_model_available")
    states = {
        (lb["source"], lb["state"]): v for lb, v in samples(metrics.text, "fusion_model_state")
    }
    assert states[(QWEN, "loading")] == 1 and states[(QWEN, "up")] == 0


async def test_loading_failed_is_503_with_the_reason_and_live_stays_200():
    broken = load_config(None, models=[{"name": "x", "source": "pip:no-such-model"}])
    app = create_app(broken)
    async with serve(app) as http, app.router.lifespan_context(app):
        for _ in range(100):
            if app.state.fusion.load_error:
                break
            await asyncio.sleep(0.02)
        r = await http.get("/health")
        assert r.status_code == 503
        assert r.json()["status"] == "failed" and "unknown pip model" in r.json()["error"]
        assert (await http.get("/live")).status_code == 200
        chat = await http.post("/v1/chat/completions", json=CHAT)
        assert chat.status_code == 503 and chat.headers["retry-after"]


async def test_live_asks_no_engine_and_needs_no_key(trio):
    models = trio()
    calls = []

    async def counted() -> None:
        calls.append(1)

    for m in models:
        m.engine.check_health = counted
    cfg = load_config(
        None,
        models=[{"name": n, "source": s} for n, s in DEFAULT_SOURCES.items()],
        server={"api_keys": ["s3cret"]},
    )
    async with serve(create_app(cfg, models=models)) as http:
        live = await http.get("/live")
        assert live.status_code == 200 and calls == []
        assert (await http.get("/health")).status_code == 200 and len(calls) == 3


async def test_an_ejected_engine_is_probed_back_and_health_shows_it_up_again(trio):
    models = trio()
    check = models[0].engine.check_health
    models[0].engine.check_health = died
    async with serve(create_app(config(), models=models)) as http:
        assert (await http.get("/health")).json()["engines"][SMOL]["state"] == "ejected"
        models[0].engine.check_health = check  # its probe (check, one token) now passes
        for _ in range(60):
            body = (await http.get("/health")).json()
            if body["engines"][SMOL] == {"state": "up"}:
                break
            await asyncio.sleep(0.05)
        assert body["status"] == "ok" and body["engines"][SMOL] == {"state": "up"}
        metrics = (await http.get("/metrics")).text
        chat = await http.post("/v1/chat/completions", json=CHAT)
    assert gauges(metrics, "fusion_model_returns_total", "source") == {SMOL: 1}
    assert gauges(metrics, "fusion_model_ejections_total", "source") == {SMOL: 1}
    assert "dropped" not in chat.json()["usage"]["models"][SMOL]


async def test_a_request_for_an_ejected_model_alone_is_a_503_streamed_or_not(trio):
    """Before the stream starts: a client sees the status, not a 200 and then an error."""
    models = trio()
    models[0].engine.check_health = died  # ejected by the first health check, and its
    # probe keeps it out (the check runs after the probe's token)
    async with serve(create_app(config(), models=models)) as http:
        assert (await http.get("/health")).json()["engines"][SMOL]["state"] == "ejected"
        alone = {**CHAT, "model": SMOL}
        plain = await http.post("/v1/chat/completions", json=alone)
        streamed = await http.post("/v1/chat/completions", json={**alone, "stream": True})
        fused = await http.post("/v1/chat/completions", json=CHAT)
    for r in (plain, streamed):
        assert r.status_code == 503, r.text
        assert r.headers["content-type"].startswith("application/json")
        assert "ejected since" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
    assert fused.status_code == 200  # the others answer
    assert fused.json()["usage"]["models"][SMOL]["dropped"].startswith("ejected since")


async def test_the_fused_model_with_every_member_ejected_is_a_503_and_its_variant_too(trio):
    models = trio()
    for m in models:
        m.engine.check_health = died  # every member ejected, and kept out by its probe
    fusion = {"variants": {"fusion-cool": {"selection": {"rule": "mean_ppl"}}}}
    async with serve(create_app(config(**fusion), models=models)) as http:
        health = await http.get("/health")
        fused = await http.post("/v1/chat/completions", json=CHAT)
        variant = await http.post(
            "/v1/chat/completions", json={**CHAT, "model": "fusion-cool", "stream": True}
        )
    assert health.status_code == 503
    for r in (fused, variant):
        assert r.status_code == 503, r.text
        message = r.json()["error"]["message"]
        assert all(f"{name}: ejected since" in message for name in (SMOL, GEMMA, QWEN))
