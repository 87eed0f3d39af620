"""Tool calls in the core: each member's view of the tools and the history, the grammar
calls are written under, and reading calls back."""

from __future__ import annotations

import json

import pytest

from fusion.grammar import AnswerGrammar
from fusion.models import PLAIN_TEMPLATE, ChatTemplate, load_chat_template
from fusion.tools import call_grammar, for_template, parse_calls, system_block

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
CALL = '<tool_call>\n{"name":"get_weather","arguments":{"city":"Paris"}}\n</tool_call>'
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
]


def complete(grammar, text: str) -> bool:
    prefix, done = AnswerGrammar(grammar).valid_prefix(text)
    return prefix == text and done


def test_required_answers_are_calls_with_the_declared_arguments_only():
    grammar = call_grammar([WEATHER, ADD], "required")
    assert complete(grammar, CALL)
    two = CALL + '\n<tool_call>\n{"name":"add","arguments":{"a":1,"b":2}}\n</tool_call>'
    assert complete(grammar, two)
    assert not complete(grammar, "It is sunny.")
    assert not complete(grammar, CALL.replace("get_weather", "get_time"))
    assert complete(grammar, CALL.replace('"Paris"}', '"Paris","unit":"C"}'))  # not strict
    strict = {**WEATHER, "function": {**WEATHER["function"], "strict": True}}
    closed = call_grammar([strict], "required")
    assert not complete(closed, CALL.replace('"Paris"}', '"Paris","unit":"C"}'))
    assert not complete(grammar, CALL.replace('"Paris"', "7"))


def test_one_call_only_without_parallel_calls():
    grammar = call_grammar([WEATHER], "required", parallel=False)
    assert complete(grammar, CALL)
    assert not complete(grammar, CALL + "\n" + CALL)


def test_auto_allows_text_but_an_answer_that_opens_with_a_tag_must_be_calls():
    grammar = call_grammar([WEATHER], "auto")
    assert complete(grammar, "It is sunny in Paris.")
    assert complete(grammar, CALL)
    assert not complete(grammar, "<tool_call>\nnot json\n</tool_call>")
    assert call_grammar([WEATHER], "none") is None


def test_calls_are_read_back_with_ids_and_json_arguments():
    (call,) = parse_calls(CALL)
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")
    assert call.openai(0) == {
        "index": 0,
        "id": call.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": call.arguments},
    }
    assert parse_calls("It is sunny.") is None
    assert parse_calls(CALL + " and some text") is None
    assert parse_calls(CALL[:-3]) is None  # cut off (finish_reason length)


def test_a_template_without_tools_gets_them_as_a_system_block_and_history_as_text():
    rendered = ChatTemplate(PLAIN_TEMPLATE).render(HISTORY, [WEATHER])
    assert rendered.startswith(system_block([WEATHER]))
    assert '"name": "get_weather"' in rendered and "18C, sunny" in rendered
    assert "<tool_call>" in rendered and "<tool_response>\n18C, sunny\n</tool_response>" in rendered
    assert "Tool:" not in rendered  # a result is the user's turn, as Hermes' format has it


def test_a_system_message_keeps_its_text_before_the_tools():
    messages = for_template([{"role": "system", "content": "Be brief."}], [WEATHER], False)
    assert len(messages) == 1 and messages[0]["content"].startswith("Be brief.\n\n")


def test_a_template_that_takes_tools_renders_them_and_the_history_itself(model_dirs):
    template = load_chat_template(model_dirs["qwen2.5-0.5b"])
    assert template is not None
    chat = ChatTemplate(template)
    assert chat.takes_tools
    rendered = chat.render(HISTORY, [WEATHER])
    assert rendered.count('"name": "get_weather"') >= 2  # in <tools>, and the call itself
    assert '"arguments": {"city": "Paris"}' in rendered  # an object, not JSON in a string
    assert "<tool_response>\n18C, sunny\n</tool_response>" in rendered
    assert system_block([WEATHER]) not in rendered  # the template's own words


@pytest.mark.parametrize("arguments", ['{"city": "Paris"}', {"city": "Paris"}])
def test_history_arguments_as_text_or_object_render_alike(arguments):
    history = json.loads(json.dumps(HISTORY))
    history[1]["tool_calls"][0]["function"]["arguments"] = arguments
    (_, _, call, _) = for_template(history, [WEATHER], False)  # the system block first
    assert call["content"] == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    )


def test_a_call_after_leading_whitespace_or_text_is_not_a_call_under_auto():
    grammar = call_grammar([WEATHER], "auto")
    assert not complete(grammar, "\n" + CALL)  # a call opens the answer, or it is text
    assert parse_calls("\n" + CALL) is None
    assert complete(grammar, CALL + "\n")  # a last newline ends the calls


def test_a_call_naming_no_given_function_or_with_non_object_arguments_is_text():
    assert parse_calls(CALL, ["get_weather"]) is not None
    assert parse_calls(CALL, ["add"]) is None
    assert parse_calls('<tool_call>\n{"name":"get_weather","arguments":"x"}\n</tool_call>') is None


def test_free_form_object_arguments_stay_free_form():
    free = {
        "type": "function",
        "function": {
            "name": "search",
            "strict": True,
            "parameters": {
                "type": "object",
                "properties": {"filters": {"type": "object"}, "kind": {"enum": ["a", "b"]}},
            },
        },
    }
    arguments = '{"filters":{"year":2020},"kind":"a"}'
    call = f'<tool_call>\n{{"name":"search","arguments":{arguments}}}\n</tool_call>'
    assert complete(call_grammar([free], "required"), call)
