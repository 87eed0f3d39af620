"""Selection policies at the edges: config.yaml's fusion.selection, the request's
fusion.selection, the trace, and the statistics (scripted engines, in-process)."""

from __future__ import annotations

import pytest

from server.config import ConfigError, load_config

CHAT = {"model": "fusion", "messages": [{"role": "user", "content": "hi"}]}
MODELS = "models: [{name: a, source: x}, {name: b, source: y}]\n"


def weak_pair_and_leader(make_model):
    return [
        make_model("smollm2-135m", "The cat sat on the rug."),
        make_model("gemma3-270m", "The cat sat on the rug."),
        make_model("qwen2.5-0.5b", "The cat sat on the mat."),
    ]


@pytest.mark.parametrize(
    ("selection", "field"),
    [
        ("{rule: vote}", "fusion.selection.rule"),
        ("{rule: gate}", "selection.leader"),
        ("{rule: leader, leader: c}", "fusion.selection.leader"),
        ("{weights: {a: 1, c: 2}}", "fusion.selection.weights"),
        ("{rule: zscore}", "selection.calibration"),
        ("{calibration: {a: {nll_mean: 1, nll_std: 0}}}", "fusion.selection.calibration.a.nll_std"),
        ("{gate_threshold: 1.5}", "fusion.selection.gate_threshold"),
        ("{repetition_limit: -1}", "fusion.selection.repetition_limit"),
        ("{leader_margin: 1.0}", "selection.leader"),
        ("{leader: b, leader_margin: -1}", "fusion.selection.leader_margin"),
        ("{leader_excess: 2}", "selection.leader"),
        ("{min_support: 0}", "fusion.selection.min_support"),
        ("{leader: b, leader_excess: -1}", "fusion.selection.leader_excess"),
    ],
)
def test_invalid_selection_config_names_the_field(tmp_path, selection, field):
    path = tmp_path / "c.yaml"
    path.write_text(MODELS + f"fusion: {{selection: {selection}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert field in str(err.value)


def test_unknown_default_members_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(MODELS + "fusion: {models: [a, c]}\n")
    with pytest.raises(ConfigError, match=r"fusion\.models"):
        load_config(path)


def test_selection_config_becomes_the_cores_policy(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        MODELS
        + "fusion:\n  selection:\n    rule: gate\n    leader: b\n    weights: {a: 0.5, b: 2}\n"
        "    calibration: {a: {nll_mean: 1.5, nll_std: 0.5}}\n    repetition_limit: 2\n"
        "    leader_margin: 0.75\n    leader_excess: 2.5\n    min_support: 2\n"
    )
    policy = load_config(path).fusion.selection.policy()
    assert policy.rule == "gate" and policy.leader == "b" and policy.gate_fallback == "weighted"
    assert dict(policy.weights) == {"a": 0.5, "b": 2.0}
    assert dict(policy.calibration)["a"].std == 0.5
    assert policy.repetition_limit == 2 and policy.gate_threshold == 0.5
    assert policy.leader_margin == 0.75 and policy.leader_excess == 2.5
    assert policy.min_support == 2


@pytest.mark.parametrize(
    "shipped", ["config.yaml", "config.vllm-cpu.yaml", "config.transformers.yaml"]
)
def test_the_papers_methods_stay_reachable_by_name_exactly(shipped):
    """Whatever policy the shipped `fusion` uses, `fusion-cool` and `fusion-cool-rerank`
    are the paper's: its method, the arithmetic mean of perplexities, no guard."""
    fusion = load_config(shipped).fusion
    for name, method in (("fusion-cool", "cool"), ("fusion-cool-rerank", "cool_rerank")):
        assert fusion.variants[name].method == method
        policy = fusion.variant_selection(name).policy()
        assert policy.rule == "mean_ppl" and policy.repetition_limit == 0
        # no filter inherited from the default's policy: every candidate may win
        assert policy.min_support == 1
        assert policy.leader_margin is None and policy.leader_excess is None
    assert fusion.ppl_mode == "mean" and not fusion.variants["fusion-cool"].ppl_mode


async def test_a_request_can_choose_the_leader_rule(client, make_model):
    async with client(models=weak_pair_and_leader(make_model)) as http:
        paper = await http.post("/v1/chat/completions", json={**CHAT, "fusion": {"trace": True}})
        body = {
            **CHAT,
            "fusion": {"trace": True, "selection": {"rule": "leader", "leader": "qwen2.5-0.5b"}},
        }
        led = await http.post("/v1/chat/completions", json=body)
    assert paper.json()["choices"][0]["message"]["content"] == "The cat sat on the rug."
    choice = led.json()["choices"][0]
    assert choice["message"]["content"] == "The cat sat on the mat."
    segs = choice["fusion"]["segments"]
    assert {s["step"] for s in segs} == {"fused"} and {s["rule"] for s in segs} == {"leader"}
    split = next(s for s in segs if len(s["candidates"]) > 1)
    mat = next(c for c in split["candidates"] if c["text"] == " mat.")
    assert mat["score"] == mat["perplexities"]["qwen2.5-0.5b"] and mat["excluded"] is False


async def test_gated_steps_show_in_the_trace_and_the_stats(client, make_model):
    async with client(models=weak_pair_and_leader(make_model)) as http:
        body = {
            **CHAT,
            "fusion": {"trace": True, "selection": {"rule": "gate", "leader": "qwen2.5-0.5b"}},
        }
        r = await http.post("/v1/chat/completions", json=body)
        await http.post("/v1/chat/completions", json=CHAT)
        stats = (await http.get("/v1/fusion/stats")).json()
    segs = r.json()["choices"][0]["fusion"]["segments"]
    assert {s["step"] for s in segs} == {"gated"}
    assert stats["policies"]["gate"] == {"gated": len(segs), "fused": 0, "filtered": 0}
    assert (
        stats["policies"]["mean_ppl"]["gated"] == 0 and stats["policies"]["mean_ppl"]["fused"] > 0
    )


@pytest.mark.parametrize(
    ("selection", "param"),
    [
        ({"rule": "leader", "leader": "nobody"}, "fusion.selection.leader"),
        ({"weights": {"qwen2.5-0.5b": 2, "nobody": 1}}, "fusion.selection.weights"),
        ({"rule": "gate"}, "fusion.selection.leader"),
        ({"rule": "zscore"}, "fusion.selection.calibration"),
        ({"rule": "vote"}, "fusion.selection.rule"),
        ({"gate_threshold": 0}, "fusion.selection.gate_threshold"),
        ({"weigths": {}}, "fusion.selection.weigths"),
    ],
)
async def test_bad_selection_requests_are_400_naming_the_field(client, selection, param):
    async with client() as http:
        r = await http.post(
            "/v1/chat/completions", json={**CHAT, "fusion": {"selection": selection}}
        )
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in (err["param"] or "") + err["message"], err


async def test_stats_summarise_perplexity_robustly(client, make_model):
    async with client(models=weak_pair_and_leader(make_model)) as http:
        await http.post("/v1/chat/completions", json=CHAT)
        stats = (await http.get("/v1/fusion/stats")).json()
    for s in stats["sources"].values():
        if s["mean_perplexity"] is None:
            continue
        # for positive numbers: geometric mean <= arithmetic mean; the median lies within
        assert s["geomean_perplexity"] <= s["mean_perplexity"] + 1e-9
        assert s["median_perplexity"] > 0


async def test_configured_members_are_the_fused_models_default(trio):
    import httpx

    from server.app import create_app

    config = load_config(
        None,
        models=[
            {"name": "smollm2-135m", "source": "pip:smollm2-135m-instruct"},
            {"name": "gemma3-270m", "source": "pip:gemma3-270m"},
            {"name": "qwen2.5-0.5b", "source": "pip:qwen2.5-coder-0.5b-instruct"},
        ],
        fusion={"models": ["smollm2-135m", "qwen2.5-0.5b"]},
    )
    app = create_app(config, models=trio())
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test") as http,
    ):
        default = (await http.post("/v1/chat/completions", json=CHAT)).json()
        asked = {**CHAT, "fusion": {"models": ["gemma3-270m", "qwen2.5-0.5b"]}}
        chosen = (await http.post("/v1/chat/completions", json=asked)).json()
    assert set(default["usage"]["models"]) == {"smollm2-135m", "qwen2.5-0.5b"}
    assert set(chosen["usage"]["models"]) == {"gemma3-270m", "qwen2.5-0.5b"}


async def test_a_lone_models_steps_count_for_no_policy(client):
    async with client() as http:
        await http.post("/v1/chat/completions", json={**CHAT, "model": "gemma3-270m"})
        stats = (await http.get("/v1/fusion/stats")).json()
    assert stats["policies"] == {} and stats["fused_segments"] == 0


@pytest.mark.parametrize(
    ("variants", "field"),
    [
        ("{a: {method: cool}}", "fusion.variants.a"),
        ("{fusion: {method: cool}}", "fusion.variants.fusion"),
        ("{v: {models: [a, c]}}", "fusion.variants.v.models"),
        ("{v: {selection: {rule: vote}}}", "fusion.variants.v.selection.rule"),
        ("{v: {selection: {rule: leader}}}", "fusion.variants.v.selection.leader"),
        ("{v: {selection: {weights: {c: 1}}}}", "fusion.variants.v.selection.weights"),
        ("{v: {method: paper}}", "fusion.variants.v.method"),
        ("{v: {models: [a], method: rerank}}", "fusion.variants.v: method rerank"),
        ("{v: {models: [b], method: cool_rerank}}", "fusion.variants.v: method cool_rerank"),
    ],
)
def test_invalid_variant_names_the_field(tmp_path, variants, field):
    path = tmp_path / "c.yaml"
    path.write_text(MODELS + f"fusion: {{variants: {variants}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert field in str(err.value)


async def test_a_variant_is_a_model_name_with_its_own_settings(make_model):
    """`fusion` runs the configured leader rule; the variant `fusion-paper` runs the
    paper's rule by name (as a chat UI or lm-eval would pick it), and a request's own
    fusion.selection still goes on top of a variant's."""
    import httpx

    from server.app import create_app
    from tests.conftest import _wait_ready

    config = load_config(
        None,
        models=[
            {"name": "smollm2-135m", "source": "pip:smollm2-135m-instruct"},
            {"name": "gemma3-270m", "source": "pip:gemma3-270m"},
            {"name": "qwen2.5-0.5b", "source": "pip:qwen2.5-coder-0.5b-instruct"},
        ],
        fusion={
            "selection": {"rule": "leader", "leader": "qwen2.5-0.5b"},
            "variants": {
                "fusion-paper": {"selection": {"rule": "mean_ppl"}, "description": "paper"},
                "fusion-pair": {"models": ["smollm2-135m", "gemma3-270m"], "method": "rerank"},
            },
        },
    )
    app = create_app(config, weak_pair_and_leader(make_model))
    async with app.router.lifespan_context(app):
        await _wait_ready(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            cards = {c["id"]: c for c in (await http.get("/v1/models")).json()["data"]}
            tuned = await http.post("/v1/chat/completions", json=CHAT)
            paper = await http.post("/v1/chat/completions", json={**CHAT, "model": "fusion-paper"})
            led = await http.post(
                "/v1/chat/completions",
                json={
                    **CHAT,
                    "model": "fusion-paper",
                    "fusion": {"selection": {"rule": "leader"}},
                },
            )
            pair = await http.post("/v1/chat/completions", json={**CHAT, "model": "fusion-pair"})
    assert cards["fusion"]["fusion"]["selection"] == "leader"
    assert cards["fusion-paper"]["fusion"]["selection"] == "mean_ppl"
    assert cards["fusion-paper"]["parent"] == "fusion"
    assert cards["fusion-pair"]["fusion"]["sources"] == ["smollm2-135m", "gemma3-270m"]
    assert cards["fusion-pair"]["fusion"]["method"] == "rerank"
    assert tuned.json()["choices"][0]["message"]["content"] == "The cat sat on the mat."
    assert paper.json()["model"] == "fusion-paper"
    assert paper.json()["choices"][0]["message"]["content"] == "The cat sat on the rug."
    assert led.json()["choices"][0]["message"]["content"] == "The cat sat on the mat."
    assert set(pair.json()["usage"]["models"]) == {"smollm2-135m", "gemma3-270m"}


@pytest.mark.parametrize("method", ["rerank", "cool_rerank"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_source_model_by_name_refuses_the_rerank_methods(client, method, stream):
    """Reranking is the fused model's: a source model by name says so before any stream
    starts (it answered as cool before, its stream and logprobs those of cool)."""
    fusion = {"method": method}
    chat = {**CHAT, "model": "qwen2.5-0.5b", "stream": stream, "fusion": fusion}
    text = {"model": "qwen2.5-0.5b", "prompt": "hi", "stream": stream, "fusion": fusion}
    async with client() as http:
        for path, body in (("/v1/chat/completions", chat), ("/v1/completions", text)):
            r = await http.post(path, json=body)
            assert r.status_code == 400, r.text
            err = r.json()["error"]
            assert err["param"] == "fusion.method" and method in err["message"], err


def test_a_one_model_fused_model_cannot_rerank(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(MODELS + "fusion: {models: [a], method: rerank}\n")
    with pytest.raises(ConfigError, match=r"fusion: method rerank .* one \(a\): use cool"):
        load_config(path)
    path.write_text(MODELS + "fusion: {models: [a], method: cool}\n")
    assert load_config(path).fusion.variant_models("fusion") == ["a"]


@pytest.mark.parametrize("method", ["rerank", "cool_rerank"])
@pytest.mark.parametrize("stream", [False, True])
async def test_a_one_model_subset_refuses_the_rerank_methods(client, method, stream):
    """Reranking one member's answers chooses nothing (and cool_rerank wrote its answer
    twice): a 400 before any stream starts; two members rerank."""
    async with client() as http:
        for models, status in ((["qwen2.5-0.5b"], 400), (["qwen2.5-0.5b", "gemma3-270m"], 200)):
            fusion = {"method": method, "models": models}
            body = {**CHAT, "stream": stream, "fusion": fusion}
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == status, r.text
            if status == 400:
                err = r.json()["error"]
                assert err["param"] == "fusion.models", err
                assert f"fusion.method {method} reranks" in err["message"], err
                assert "(qwen2.5-0.5b)" in err["message"], err


async def test_a_one_model_variant_refuses_rerank_naming_where_the_method_came_from(make_model):
    """A variant of one member asked to rerank: param fusion.method; a fused model whose
    configured method reranks, asked for one member: param fusion.models, and the message
    says the method is the model's own."""
    import httpx

    from server.app import create_app
    from tests.conftest import _wait_ready

    models = [
        {"name": "gemma3-270m", "source": "pip:gemma3-270m"},
        {"name": "qwen2.5-0.5b", "source": "pip:qwen2.5-coder-0.5b-instruct"},
    ]
    variants = {"fusion-solo": {"models": ["qwen2.5-0.5b"]}}
    with pytest.raises(ConfigError, match=r"fusion.variants.fusion-solo: method rerank"):
        load_config(None, models=models, fusion={"method": "rerank", "variants": variants})
    variants["fusion-solo"]["method"] = "cool"  # type: ignore[index]
    config = load_config(None, models=models, fusion={"method": "rerank", "variants": variants})
    app = create_app(config, weak_pair_and_leader(make_model)[1:])
    async with app.router.lifespan_context(app):
        await _wait_ready(app)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            solo = {**CHAT, "model": "fusion-solo", "fusion": {"method": "cool_rerank"}}
            asked = await http.post("/v1/chat/completions", json=solo)
            one = {**CHAT, "fusion": {"models": ["gemma3-270m"]}}
            own = await http.post("/v1/chat/completions", json=one)
            cool = await http.post("/v1/chat/completions", json={**CHAT, "model": "fusion-solo"})
    assert asked.status_code == 400 and own.status_code == 400, (asked.text, own.text)
    assert asked.json()["error"]["param"] == "fusion.method"
    assert "fusion.method cool_rerank reranks" in asked.json()["error"]["message"]
    assert own.json()["error"]["param"] == "fusion.models"
    assert "`fusion`'s method rerank reranks" in own.json()["error"]["message"]
    assert "(gemma3-270m): use cool, or name more" in own.json()["error"]["message"]
    assert cool.status_code == 200, cool.text


async def test_a_source_model_by_name_runs_cool_shortest_as_asked(client):
    """The same text as cool (one tokenizer: the same boundaries), counted as the method
    asked for (it ran as cool before)."""
    async with client() as http:
        texts = []
        for method in ("cool", "cool_shortest"):
            body = {**CHAT, "model": "qwen2.5-0.5b", "fusion": {"method": method}}
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["message"]["content"])
        metrics = (await http.get("/metrics")).text
    assert texts[0] and texts[0] == texts[1]
    assert 'method="cool_shortest",model="qwen2.5-0.5b"' in metrics
