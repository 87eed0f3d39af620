"""Method vote at the edges: config.yaml's answer and vote settings (fused model and
variants), the request's fusion.answer and fusion.vote, the trace, /v1/models and
streaming (scripted engines that sample listed answers, in-process)."""

from __future__ import annotations

import json

import httpx
import pytest

from fusion.answers import EXTRACTOR_NAMES, last_number
from server.app import create_app
from server.config import ConfigError, load_config
from tests.conftest import _wait_ready

CHAT = {"model": "fusion", "messages": [{"role": "user", "content": "6 times 7?"}]}
MODELS = "models: [{name: a, source: x}, {name: b, source: y}]\n"
TRIO = [
    {"name": "smollm2-135m", "source": "pip:smollm2-135m-instruct"},
    {"name": "gemma3-270m", "source": "pip:gemma3-270m"},
    {"name": "qwen2.5-0.5b", "source": "pip:qwen2.5-coder-0.5b-instruct"},
]


@pytest.mark.parametrize(
    ("fusion", "field"),
    [
        ("{method: vote}", "fusion.answer"),
        ("{answer: nope}", "fusion.answer"),
        ("{vote: {k: 0}}", "fusion.vote.k"),
        ("{vote: {threshold: 1.5}}", "fusion.vote.threshold"),
        ("{variants: {v: {method: vote}}}", "fusion.variants.v.answer"),
        ("{variants: {v: {answer: 'regex:('}}}", "fusion.variants.v.answer"),
        ("{variants: {v: {vote: {budget: 0}}}}", "fusion.variants.v.vote.budget"),
        ("{variants: {v: {vote: {kk: 1}}}}", "fusion.variants.v.vote.kk"),
    ],
)
def test_invalid_vote_config_names_the_field(tmp_path, fusion, field):
    path = tmp_path / "c.yaml"
    path.write_text(MODELS + f"fusion: {fusion}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert field in str(err.value)


def test_a_vote_variant_inherits_the_fused_model_s_answer_and_vote_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        MODELS + "fusion: {answer: choice, vote: {k: 2, budget: 6}, "
        "variants: {v: {method: vote, vote: {k: 3}}}}\n"
    )
    config = load_config(path)
    answer, vote = config.fusion.variant_vote("v")
    assert answer == "choice" and (vote.k, vote.budget) == (3, 6)


@pytest.mark.parametrize(
    ("fusion", "param", "names"),
    [
        ({"method": "vote"}, "fusion.answer", True),
        ({"method": "vote", "answer": "nope"}, "fusion.answer", True),
        ({"method": "vote", "answer": "regex:("}, "fusion.answer", False),
        ({"method": "vote", "answer": "exact", "vote": {"k": 0}}, "fusion.vote.k", False),
        ({"method": "vote", "answer": "exact", "vote": {"k": 99}}, "fusion.vote.k", False),
        ({"method": "vote", "answer": "exact", "vote": {"kk": 1}}, "fusion.vote.kk", False),
    ],
)
async def test_bad_vote_requests_are_400_naming_the_field(client, fusion, param, names):
    async with client() as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "fusion": fusion})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in (err["param"] or "") + err["message"], err
    if names:  # says which extractors exist
        assert all(n in err["message"] for n in EXTRACTOR_NAMES), err


@pytest.mark.parametrize(
    ("fusion", "param"),
    [
        ({"answer": "exact"}, "fusion.answer"),
        ({"method": "cool", "vote": {"k": 2}}, "fusion.vote"),
        (
            {"method": "vote", "answer": "exact", "max_segment_tokens": 8},
            "fusion.max_segment_tokens",
        ),
        (
            {"method": "vote", "answer": "exact", "selection": {"rule": "leader"}},
            "fusion.selection.rule",
        ),
        (
            {"method": "vote", "answer": "exact", "selection": {"min_support": 2}},
            "fusion.selection.min_support",
        ),
    ],
)
async def test_fields_the_method_does_not_read_are_400_not_ignored(client, fusion, param):
    async with client() as http:
        r = await http.post("/v1/chat/completions", json={**CHAT, "fusion": fusion})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


async def test_a_source_model_by_name_votes_on_its_own_samples(client, make_model):
    models = [make_model("qwen2.5-0.5b", "x", answers=["So 7.", "7", "It is 8.", "7."])]
    async with client(models=models) as http:
        body = {
            **CHAT,
            "model": "qwen2.5-0.5b",
            "fusion": {
                "method": "vote",
                "answer": "last_number",
                "vote": {"seed": 3},
                "trace": True,
            },
        }
        r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    vote = r.json()["choices"][0]["fusion"]["segments"][0]["vote"]
    assert vote["key"] == "7" and len(vote["samples"]) == 4
    assert last_number(r.json()["choices"][0]["message"]["content"]) == "7"


async def test_n_choices_draw_samples_with_seeds_of_their_own(client, make_model):
    models = vote_trio(make_model)
    for seed in (None, 11):  # the method's seed, then the request's
        for m in models:
            m.engine.sampled.clear()
        async with client(models=models) as http:
            body = {
                **CHAT,
                "n": 3,
                "fusion": {"method": "vote", "answer": "last_number", "vote": {"seed": 5}},
            }
            if seed is not None:
                body["seed"] = seed
            r = await http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        seeds = [s.seed for m in models for s in m.engine.sampled]
        assert len(seeds) == len(set(seeds)) >= 12, seeds  # 3 choices x 4+ samples


async def test_a_request_s_null_vote_seed_draws_fresh_samples(make_model):
    config = load_config(None, models=TRIO, fusion={"answer": "last_number", "vote": {"seed": 5}})
    models = vote_trio(make_model)
    app = create_app(config, models)
    async with app.router.lifespan_context(app):
        await _wait_ready(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            for vote, fresh in (({}, False), ({"seed": None}, True)):
                for m in models:
                    m.engine.sampled.clear()
                body = {**CHAT, "fusion": {"method": "vote", "vote": vote}}
                r = await http.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text
                seeds = [s.seed for m in models for s in m.engine.sampled]
                assert seeds and all((x is None) == fresh for x in seeds), (vote, seeds)


def vote_trio(make_model):
    return [
        make_model("smollm2-135m", "x", answers=["So 7.", "It is 7.", "7", "Maybe 7."]),
        make_model("gemma3-270m", "x", answers=["1", "2", "3", "4"]),
        make_model("qwen2.5-0.5b", "x", answers=["42", "6 times 7 is 41", "40", "39"]),
    ]


async def test_a_vote_variant_is_listed_and_answers_with_its_vote_in_the_trace(make_model):
    config = load_config(
        None,
        models=TRIO,
        fusion={
            "selection": {"rule": "gate", "leader": "qwen2.5-0.5b"},
            "variants": {
                "fusion-vote": {"method": "vote", "answer": "last_number", "vote": {"seed": 0}}
            },
        },
    )
    app = create_app(config, vote_trio(make_model))
    async with app.router.lifespan_context(app):
        await _wait_ready(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            cards = {c["id"]: c for c in (await http.get("/v1/models")).json()["data"]}
            body = {**CHAT, "model": "fusion-vote", "fusion": {"trace": True}}
            r = await http.post("/v1/chat/completions", json=body)
    card = cards["fusion-vote"]["fusion"]
    assert card["method"] == "vote" and card["answer"] == "last_number"
    assert "answer" not in cards["fusion"]["fusion"]
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    # the leader's four answers disagree; smollm2's all say 7: sampling stops there
    assert choice["message"]["content"] in ("So 7.", "It is 7.", "7", "Maybe 7.")
    (seg,) = choice["fusion"]["segments"]
    vote = seg["vote"]
    assert vote["key"] == "7" and vote["stopped"] == "agreed: smollm2-135m"
    assert vote["tally"] == {"42": 1.0, "41": 1.0, "40": 1.0, "39": 1.0, "7": 4.0}
    assert [s["model"] for s in vote["samples"]] == ["qwen2.5-0.5b"] * 4 + ["smollm2-135m"] * 4
    assert {c["text"] for c in seg["candidates"]} == {"So 7.", "It is 7.", "7", "Maybe 7."}
    usage = r.json()["usage"]["models"]
    assert usage["gemma3-270m"]["generated_tokens"] == 0
    assert usage["qwen2.5-0.5b"]["generated_tokens"] > 0


async def test_a_streamed_vote_sends_its_answer_once_at_the_end(client, make_model):
    async with client(models=vote_trio(make_model)) as http:
        body = {
            **CHAT,
            "stream": True,
            "fusion": {"method": "vote", "answer": "last_number", "vote": {"seed": 1}},
        }
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [x async for x in r.aiter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x[6:]) for x in lines[:-1]]
    content = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    texts = [t for t in content if t]
    assert len(texts) == 1 and last_number(texts[0]) == "7"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
