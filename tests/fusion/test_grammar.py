"""Structured outputs: the grammar in each member's real tokens (llguidance), the answer's
grammar over bytes, and the loop keeping a fused answer valid."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fusion.grammar import AnswerGrammar, GrammarError, GrammarSpec, MemberGrammar, Vocabularies
from fusion.grammar import json_schema as schema_spec
from fusion.loop import Fuser
from fusion.types import FusionOutcome, FusionParams, Prompt

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
CHAT = Prompt(messages=({"role": "user", "content": "Give me JSON."},))


@pytest.mark.parametrize(
    ("spec", "valid", "invalid"),
    [
        (schema_spec(PERSON), '{"name":"Ada","age":36}', '{"name":"Ada"}'),
        (schema_spec(None), '{"x":[1,2]}', "[1,2]"),
        (GrammarSpec("regex", r"\d{3}-\d{4}"), "555-0199", "555-01999"),
        (GrammarSpec("choice", json.dumps(["yes", "no"])), "no", "maybe"),
        (GrammarSpec("grammar", 'start: "a"+ "b"'), "aaab", "b"),
        (GrammarSpec("grammar", 'root ::= "x" [0-9]+'), "x42", "x"),
    ],
)
def test_each_grammar_kind_accepts_what_it_should_and_no_more(spec, valid, invalid):
    def complete(text: str) -> bool:
        prefix, done = AnswerGrammar(spec).valid_prefix(text)
        return prefix == text and done

    assert complete(valid)
    assert not complete(invalid)


@pytest.mark.parametrize(
    "spec",
    [
        GrammarSpec("regex", "("),
        GrammarSpec("grammar", "start: undefined_rule"),
        GrammarSpec("json", json.dumps({"type": "no-such-type"})),
    ],
)
def test_a_grammar_that_does_not_compile_says_why(spec):
    with pytest.raises(GrammarError, match="does not compile"):
        _ = spec.compiled


def test_the_answer_grammar_cuts_to_the_longest_valid_prefix_on_whole_characters():
    spec = schema_spec({"type": "object", "properties": {"w": {"type": "string"}}})
    answer = AnswerGrammar(spec)
    assert answer.valid_prefix('{"w":"caf') == ('{"w":"caf', False)
    assert answer.valid_prefix('{"w":"x"} and more') == ('{"w":"x"}', True)
    assert answer.valid_prefix("Sure! {") == ("", False)
    answer.commit('{"w":"caf')  # the answer so far; what follows is judged after it
    assert answer.valid_prefix('é"}') == ('é"}', True)
    assert answer.valid_prefix("é\n") == ("é", False)  # a raw newline cannot be in a string
    assert not answer.done
    answer.commit('é"}')
    assert answer.done


@pytest.fixture(scope="module")
def smol(default_adapters):
    adapter = default_adapters["smollm2-135m"]
    vocab = Vocabularies().get("smollm2-135m", adapter.tokenizer.to_str, frozenset(adapter.eos_ids))
    return adapter, vocab


def test_a_member_grammar_masks_its_own_tokens(smol):
    adapter, vocab = smol
    grammar = MemberGrammar(vocab, GrammarSpec("regex", r"\d+"))
    flat = np.zeros(vocab.vocab_size + 7, dtype=np.float32)  # wider than the vocabulary
    masked = grammar.mask(flat)
    assert masked.dtype == flat.dtype and len(masked) == len(flat)
    allowed = {int(t) for t in np.flatnonzero(np.isfinite(masked))}
    digits = adapter.encode("7")
    assert set(digits) <= allowed
    assert not set(adapter.encode("x")) & allowed
    assert not allowed & set(range(vocab.vocab_size, len(flat)))  # padding rows never
    assert not allowed & set(adapter.eos_ids)  # nothing written yet: no end
    assert grammar.take(digits[0])
    after = grammar.mask(flat)
    assert all(np.isfinite(after[e]) for e in adapter.eos_ids)  # "7" may end the answer


def test_a_member_rewinds_what_a_call_took_and_commits_another_models_tokens(smol):
    adapter, vocab = smol
    grammar = MemberGrammar(vocab, schema_spec(PERSON))
    assert not grammar.take(adapter.encode("x")[0])  # refused, and no move
    for tok in adapter.encode('{"name":"Bo'):
        assert grammar.take(tok)
    grammar.rewind()  # the loop: that call's candidate did not win
    assert grammar.taken == 0
    # the winner, written by another model, in this member's tokens one character at a
    # time (not how it would tokenize it): bytes are what the grammar checks
    pieces = [t for ch in '{"name":"Ada","age":' for t in adapter.encode(ch)]
    grammar.commit(pieces)
    assert not grammar.lost
    assert grammar.take(adapter.encode("3")[0])
    assert not grammar.take(adapter.encode('"')[0])  # age is an integer


def test_a_member_given_text_outside_its_grammar_stops_constraining(smol):
    adapter, vocab = smol
    grammar = MemberGrammar(vocab, GrammarSpec("regex", "ab"))
    grammar.commit(adapter.encode("zz"))
    assert grammar.lost


async def test_an_unconstrained_members_text_is_cut_and_the_answer_stays_valid(make_model):
    """Scripted engines cannot constrain: each candidate is cut to the longest valid
    prefix (the trace marks it), and one cut to nothing is dropped (the trace names it)."""
    chatty = make_model("gemma3-270m", 'Sure! Here it is: {"name":"Bob","age":7}')
    direct = make_model("qwen2.5-0.5b", '{"name":"Ada","age":36}!!')
    fuser = Fuser([chatty, direct])
    params = FusionParams(max_tokens=64, grammar=schema_spec(PERSON))
    outcome = FusionOutcome()
    segments = [s async for s in fuser.run(CHAT, params, outcome)]
    assert json.loads(outcome.text) == {"name": "Ada", "age": 36}
    assert outcome.finish_reason == "stop"
    assert segments[0].cut_to_nothing == ("gemma3-270m",)
    (won,) = [c for c in segments[0].candidates if c.text == outcome.text]
    assert won.cut and not won.ended  # "!!" and its end token cut off
    assert not any("Sure" in c.text or "!" in c.text for s in segments for c in s.candidates)


async def test_without_a_grammar_nothing_is_cut(make_model):
    direct = make_model("qwen2.5-0.5b", '{"name":"Ada","age":36} Hope this helps.')
    outcome = FusionOutcome()
    segments = [s async for s in Fuser([direct]).run(CHAT, FusionParams(max_tokens=64), outcome)]
    assert outcome.text.endswith("Hope this helps.")
    assert not any(c.cut for s in segments for c in s.candidates)


def test_renormalised_scores_drop_the_mass_the_grammar_forbids(smol):
    from fusion.grammar import renormalised

    adapter, vocab = smol
    digits, letters = adapter.encode("7"), adapter.encode("x")
    grammar = MemberGrammar(vocab, GrammarSpec("regex", r"\d"))
    # the scorer thinks "x" likelier than "7"; the grammar allows only a digit here
    top = ((letters[0], -0.5), (digits[0], -1.5))
    (lp,) = renormalised([-1.5], [top], [digits[0]], grammar)
    assert lp == pytest.approx(0.0)  # the only allowed token of those seen: all the mass
    assert grammar.taken == 0  # rewound: the member's state is the committed answer
    other = adapter.encode("3")[0]
    top = ((letters[0], -0.5), (digits[0], -1.5), (other, -1.5))
    (lp,) = renormalised([-1.5], [top], [digits[0]], grammar)
    assert lp == pytest.approx(-1.5 - np.logaddexp(-1.5, -1.5))  # two digits share it
    (lp,) = renormalised([-0.5], [top], [letters[0]], grammar)
    assert lp == -0.5  # a refused token keeps its raw score


def test_a_complete_answer_takes_its_end_token(smol):
    adapter, vocab = smol
    grammar = MemberGrammar(vocab, GrammarSpec("regex", "ab"))
    for tok in adapter.encode("ab"):
        assert grammar.take(tok)
    assert grammar.matcher.is_stopped()
    assert grammar.take(adapter.eos_ids[0])  # the member may end its answer here
    assert not grammar.take(adapter.encode("c")[0])


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"])
def test_no_special_token_is_allowed_inside_a_json_string(default_adapters, name):
    adapter = default_adapters[name]
    vocab = Vocabularies().get(name, adapter.tokenizer.to_str, frozenset(adapter.eos_ids))
    grammar = MemberGrammar(vocab, schema_spec(PERSON))
    for tok in adapter.encode('{"name":"Ada'):
        assert grammar.take(tok)
    allowed = grammar.allowed(vocab.vocab_size)
    assert not any(allowed[t] for t in adapter.special_ids), name
