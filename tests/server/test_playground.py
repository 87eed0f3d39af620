"""The playground's page and its per-model statistics, in-process (scripted engines)."""

from __future__ import annotations

import re
import statistics

import pytest

CHAT = {"model": "fusion", "messages": [{"role": "user", "content": "hi"}]}
ASSETS = ("", "playground.js", "playground.css")


def scripted(make_model):
    return [
        make_model("smollm2-135m", "The cat sat on the mat today."),
        make_model("gemma3-270m", "The cat sat on the rug today."),
        make_model("qwen2.5-0.5b", "The cat sat on the mat today."),
    ]


async def test_page_and_assets_are_served_from_the_package_without_a_cdn(client):
    async with client() as http:
        r = await http.get("/playground")
        assert r.status_code in (301, 302, 307) and r.headers["location"] == "/playground/"
        for asset in ASSETS:
            r = await http.get(f"/playground/{asset}")
            assert r.status_code == 200, asset
            # the machines are offline: every reference stays on this server
            assert not re.search(r"""(src|href)=["']?(https?:)?//""", r.text), asset
            assert "import(" not in r.text and "cdn" not in r.text.lower(), asset
        page = (await http.get("/playground/")).text
        assert "playground.js" in page and "playground.css" in page
        js = (await http.get("/playground/playground.js")).text
        assert "/v1/chat/completions" in js and "trace: true" in js


async def test_page_loads_without_a_key_while_the_api_stays_locked(client):
    async with client(api_keys=["sekret"]) as http:
        assert (await http.get("/playground/")).status_code == 200
        assert (await http.get("/v1/fusion/stats")).status_code == 401
        ok = await http.get("/v1/fusion/stats", headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200


async def test_stats_report_share_won_candidate_perplexity_and_step_latency(client, make_model):
    async with client(models=scripted(make_model)) as http:
        body = {**CHAT, "fusion": {"trace": True}}
        segs = (await http.post("/v1/chat/completions", json=body)).json()["choices"][0]["fusion"][
            "segments"
        ]
        # a single model's answer is not a fused one: it must not count
        await http.post("/v1/chat/completions", json={**CHAT, "model": "gemma3-270m"})
        stats = (await http.get("/v1/fusion/stats")).json()
    assert stats["fused_segments"] == len(segs)
    sources = stats["sources"]
    assert set(sources) == {"smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"}
    for name, s in sources.items():
        won = sum(1 for seg in segs if seg["winner"] == name)
        assert s["segments_won"] == won and s["steps"] == len(segs)
        assert s["share_won"] == won / len(segs)
        proposed = [
            c["mean_perplexity"]
            for seg in segs
            for c in seg["candidates"]
            if name in c["proposers"] and c["mean_perplexity"] is not None
        ]
        assert s["mean_perplexity"] == statistics.mean(proposed)
        # the trace rounds each time to 0.1 ms
        per_step = statistics.mean(seg["model_ms"][name] for seg in segs)
        assert s["mean_step_ms"] == pytest.approx(per_step, abs=0.1)
    assert sum(s["share_won"] for s in sources.values()) == 1.0
    assert sources["gemma3-270m"]["segments_won"] == 0  # "rug" lost to "mat"


async def test_metrics_carry_the_per_source_statistics(client, make_model):
    async with client(models=scripted(make_model)) as http:
        await http.post("/v1/chat/completions", json=CHAT)
        text = (await http.get("/metrics")).text
    shares = {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'fusion_source_win_share\{source="([^"]+)"\} (\S+)', text)
    }
    assert set(shares) == {"smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"}
    assert abs(sum(shares.values()) - 1.0) < 1e-9 and shares["gemma3-270m"] == 0.0
    assert 'fusion_source_candidate_perplexity_count{source="gemma3-270m"}' in text
    assert 'fusion_source_step_seconds_count{source="qwen2.5-0.5b"}' in text


async def test_trace_carries_step_timings_and_each_models_time(client, make_model):
    async with client(models=scripted(make_model)) as http:
        body = {**CHAT, "fusion": {"trace": True}}
        segs = (await http.post("/v1/chat/completions", json=body)).json()["choices"][0]["fusion"][
            "segments"
        ]
    for seg in segs:
        assert set(seg["timings_ms"]) == {"generate", "score", "align", "commit", "other"}
        assert abs(sum(seg["timings_ms"].values()) - seg["step_ms"]) < 0.5
        assert set(seg["model_ms"]) == {"smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"}
        assert seg["context_tokens"] > 0
