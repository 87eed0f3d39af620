"""The OpenAI SDK's Responses API (``client.responses``) over real HTTP against
`fusion-server serve --config config.yaml` (the three packaged models, `make serve`'s
default): create, streamed two ways, and parse with a Pydantic model."""

from __future__ import annotations

import pytest
from openai import OpenAI

from bench.extraction import Person, examples

pytestmark = pytest.mark.integration
ASK = "Name three fruits."


@pytest.fixture(scope="module")
def server_url(default_server_url: str) -> str:
    return default_server_url


@pytest.fixture
def client(server_url) -> OpenAI:
    return OpenAI(base_url=f"{server_url}/v1", api_key="none", max_retries=0)


def test_create_answers_and_both_streams_give_the_same_text(client):
    plain = client.responses.create(model="fusion", input=ASK, max_output_tokens=16)
    assert plain.output_text and plain.usage is not None and plain.usage.output_tokens > 0
    assert plain.id.startswith("resp_") and plain.status in ("completed", "incomplete")

    with client.responses.stream(model="fusion", input=ASK, max_output_tokens=16) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert len(deltas) > 1  # one per fused segment
    assert "".join(deltas) == final.output_text == plain.output_text  # greedy: the same

    events = list(
        client.responses.create(model="fusion", input=ASK, max_output_tokens=16, stream=True)
    )
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert streamed == events[-1].response.output_text == plain.output_text


def test_instructions_message_items_and_a_source_model_by_name(client):
    answer = client.responses.create(
        model="qwen2.5-0.5b",
        instructions="Answer with one word.",
        input=[
            {"role": "user", "content": "What colour is the sky on a clear day?"},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": [{"type": "input_text", "text": "And grass?"}]},
        ],
        max_output_tokens=8,
    )
    assert answer.model == "qwen2.5-0.5b" and answer.output_text.strip()


def test_parse_with_a_pydantic_model_gives_a_parsed_object(client):
    for example in examples(3):
        parsed = client.responses.parse(
            model="fusion", input=example.prompt, text_format=Person, max_output_tokens=64
        )
        assert isinstance(parsed.output_parsed, Person), parsed.output_text
        assert parsed.status == "completed"


def test_refusals_reach_the_sdk_as_bad_requests(client):
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as err:
        client.responses.create(model="fusion", input=ASK, previous_response_id="resp_1")
    assert "keeps no state" in str(err.value)
    with pytest.raises(BadRequestError):
        client.responses.create(model="fusion", input=ASK, store=True)
