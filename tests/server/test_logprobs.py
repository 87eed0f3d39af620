"""OpenAI's logprobs over HTTP in-process (scripted engines): a source model by name
answers with them in vLLM's shapes, the fused model refuses them saying why; token
texts as vLLM writes them (real tokenizers)."""

from __future__ import annotations

import json

from fusion.types import TokenLogprob
from server.logprobs import LogprobsAsk, TokenTexts
from tests.conftest import SCRIPT
from tests.server.test_api import sse_events

SOURCE = "smollm2-135m"
CHAT = {"model": SOURCE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
TEXT = {"model": SOURCE, "prompt": "The cat", "max_tokens": 4}
ENTRY = {"token", "logprob", "bytes", "top_logprobs"}


def chunks(body: str) -> list[dict]:
    return [json.loads(e) for e in sse_events(body) if e != "[DONE]"]


async def test_chat_logprobs_have_openais_shape_with_the_most_likely_first(client):
    async with client() as http:
        r = await http.post(
            "/v1/chat/completions", json={**CHAT, "logprobs": True, "top_logprobs": 2}
        )
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        content = choice["logprobs"]["content"]
        assert set(choice["logprobs"]) == {"content"}
        assert all(set(e) == ENTRY for e in content)
        assert "".join(e["token"] for e in content) == choice["message"]["content"]
        for e in content:
            assert e["bytes"] == list(e["token"].encode())
            assert len(e["top_logprobs"]) == 2
            assert all(set(t) == {"token", "logprob", "bytes"} for t in e["top_logprobs"])
            assert e["top_logprobs"][0]["token"] == e["token"]  # the fake's greedy token
            lps = [t["logprob"] for t in e["top_logprobs"]]
            assert lps == sorted(lps, reverse=True)
        plain = await http.post("/v1/chat/completions", json={**CHAT, "logprobs": True})
        assert all(
            e["top_logprobs"] == [] for e in plain.json()["choices"][0]["logprobs"]["content"]
        )
        off = await http.post("/v1/chat/completions", json=CHAT)
        assert off.json()["choices"][0]["logprobs"] is None


async def test_streamed_chat_chunks_carry_the_logprobs_of_their_own_tokens(client):
    async with client() as http:
        body = {**CHAT, "logprobs": True, "top_logprobs": 1, "stream": True}
        got = chunks((await http.post("/v1/chat/completions", json=body)).text)
        role, *rest = got
        assert role["choices"][0]["logprobs"] is None
        text = ""
        for c in rest:
            choice = c["choices"][0]
            delta = choice["delta"].get("content", "")
            text += delta
            if choice["finish_reason"] is None:
                tokens = [e["token"] for e in choice["logprobs"]["content"]]
                assert "".join(tokens) == delta
        whole = await http.post("/v1/chat/completions", json={**body, "stream": False})
        assert text == whole.json()["choices"][0]["message"]["content"]


async def test_completions_logprobs_have_vllms_four_lists(client):
    async with client() as http:
        r = await http.post("/v1/completions", json={**TEXT, "logprobs": 1})
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
        assert "".join(lp["tokens"]) == choice["text"]
        assert lp["text_offset"] == [
            sum(map(len, lp["tokens"][:k])) for k in range(len(lp["tokens"]))
        ]
        for token, top in zip(lp["tokens"], lp["top_logprobs"]):
            assert token in top and len(top) <= 2  # the token and the 1 most likely


async def test_echo_puts_the_prompts_tokens_first_the_first_without_a_logprob(client):
    async with client() as http:
        r = await http.post("/v1/completions", json={**TEXT, "logprobs": 2, "echo": True})
        choice = r.json()["choices"][0]
        lp = choice["logprobs"]
        assert choice["text"].startswith("The cat") and "".join(lp["tokens"]) == choice["text"]
        assert lp["tokens"][:2] == ["The", " cat"]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert all(v is not None for v in lp["token_logprobs"][1:])
        streamed = chunks(
            (
                await http.post(
                    "/v1/completions", json={**TEXT, "logprobs": 2, "echo": True, "stream": True}
                )
            ).text
        )
        first = streamed[0]["choices"][0]
        assert first["text"] == "The cat" and first["logprobs"]["tokens"] == ["The", " cat"]
        tokens = [
            t
            for c in streamed
            if c["choices"][0]["logprobs"]
            for t in c["choices"][0]["logprobs"]["tokens"]
        ]
        offsets = [
            o
            for c in streamed
            if c["choices"][0]["logprobs"]
            for o in c["choices"][0]["logprobs"]["text_offset"]
        ]
        assert tokens == lp["tokens"] and offsets == lp["text_offset"]


async def test_echo_with_max_tokens_0_answers_the_prompts_logprobs_alone(client):
    """lm-eval's log-likelihood requests (local-completions): the prompt, scored."""
    async with client() as http:
        body = {**TEXT, "max_tokens": 0, "echo": True, "logprobs": 1}
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        choice = out["choices"][0]
        assert choice["text"] == "The cat" and choice["finish_reason"] == "length"
        assert choice["logprobs"]["tokens"] == ["The", " cat"]
        assert choice["logprobs"]["token_logprobs"][0] is None
        assert out["usage"]["prompt_tokens"] == 2 and out["usage"]["completion_tokens"] == 0
        streamed = chunks((await http.post("/v1/completions", json={**body, "stream": True})).text)
        assert [c["choices"][0]["text"] for c in streamed] == ["The cat", ""]
        assert streamed[0]["choices"][0]["logprobs"] == choice["logprobs"]
        assert streamed[-1]["choices"][0]["finish_reason"] == "length"
        bare = await http.post("/v1/completions", json={**TEXT, "max_tokens": 0, "echo": True})
        assert bare.status_code == 200 and bare.json()["choices"][0]["logprobs"] is None


async def test_max_tokens_0_needs_echo_and_a_source_model(client):
    async with client() as http:
        r = await http.post("/v1/completions", json={**TEXT, "max_tokens": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        body = {**TEXT, "model": "fusion", "max_tokens": 0, "echo": True}
        r = await http.post("/v1/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert SOURCE in r.json()["error"]["message"]


async def test_the_fused_model_refuses_logprobs_naming_the_models_that_answer_them(client):
    async with client() as http:
        for path, body in (
            ("/v1/chat/completions", {**CHAT, "model": "fusion", "logprobs": True}),
            ("/v1/completions", {**TEXT, "model": "fusion", "logprobs": 0}),
        ):
            r = await http.post(path, json=body)
            assert r.status_code == 400
            err = r.json()["error"]
            assert err["param"] == "logprobs" and "tokenizers" in err["message"]
            for name in ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"):
                assert name in err["message"]


async def test_top_logprobs_needs_logprobs_and_stays_within_vllms_20(client):
    async with client() as http:
        for body, param in (
            ({**CHAT, "top_logprobs": 2}, "top_logprobs"),
            ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ):
            r = await http.post("/v1/chat/completions", json=body)
            assert r.status_code == 400 and r.json()["error"]["param"] == param
        r = await http.post("/v1/completions", json={**TEXT, "logprobs": 21})
        assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs"
        ok = await http.post("/v1/chat/completions", json={**CHAT, "top_logprobs": 0})
        assert ok.status_code == 200


def test_a_token_ending_inside_a_character_reads_as_vllm_writes_it(default_adapters):
    """vLLM 0.32 on SmolLM2, prompt "I love 😀 and é" echoed: the emoji's first byte
    token is "" and the token that completes it carries the whole character."""
    adapter = default_adapters["smollm2-135m"]
    ids = adapter.encode("I love 😀 and é")
    ask = LogprobsAsk(TokenTexts(adapter), top=0, chat=False)
    prompt = [TokenLogprob(ids[0], None), *(TokenLogprob(t, -1.0) for t in ids[1:])]
    lp = ask.writer().body((), prompt)
    assert lp["tokens"] == ["I", " love", "", " 😀", " and", " é"]
    assert lp["text_offset"] == [0, 1, 6, 6, 8, 12]
    chat = LogprobsAsk(TokenTexts(adapter), top=0, chat=True).writer()
    entries = chat.body([TokenLogprob(t, -1.0) for t in ids[2:4]])["content"]
    assert [(e["token"], e["bytes"]) for e in entries] == [("", []), (" 😀", list(" 😀".encode()))]


def test_special_tokens_read_as_their_text_and_leading_spaces_stay(default_adapters):
    for name, adapter in default_adapters.items():
        texts = TokenTexts(adapter)
        for tok in adapter.encode(" the cat  sat\n"):
            assert texts.alone(tok) == adapter.decode([tok]), name
        assert texts.alone(adapter.eos_ids[0]) == adapter.tokenizer.id_to_token(adapter.eos_ids[0])


def test_scripted_text_matches_the_scripts_tokens(default_adapters):
    adapter = default_adapters[SOURCE]
    texts = TokenTexts(adapter)
    assert "".join(texts.text(t, []) for t in adapter.encode(SCRIPT)) == SCRIPT
