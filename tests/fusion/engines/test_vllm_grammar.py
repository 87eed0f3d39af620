"""A grammar on the vLLM engines' requests (``vllm_grammar.py``), against the fake server
at the HTTP boundary (which runs no processor): every request that generates for a state
under a grammar carries it with the answer's tokens in its prompt, and no request changes
without one. vLLM itself applying it: test_vllm_engine.py and the remote integration tests."""

from __future__ import annotations

import pytest

from fusion.engine import Sampling
from fusion.engines.vllm_grammar import GRAMMAR_ARG, probe_fields, request_grammar
from fusion.grammar import GrammarSpec, MemberGrammar, Vocabularies
from tests.fusion.engines.test_vllm_lookahead import AT_TWO, make, others

ANY_TEXT = GrammarSpec("regex", r"[\s\S]*")
END = 2  # SmolLM2's end token


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return Vocabularies().get("smollm2", tokenizer.to_str, frozenset({END}))


async def step(engine, fake, name: str, sampling: Sampling) -> tuple[list[int], list[dict]]:
    """A step on a state with a committed answer: generate, score two other candidates.
    The state's context and the requests it sent."""
    context = fake.words[:6]
    st = await engine.open(name, context)
    await engine.commit(st, fake.words[6:8])
    if sampling.constraint is not None:
        sampling.constraint.commit(fake.words[6:8])  # type: ignore[attr-defined]
    before = len(fake.requests)
    gen = await engine.generate(st, 8, frozenset({END}), AT_TWO, sampling)
    await engine.score(st, list(others(fake, list(gen.ids[:1]))))
    await engine.release(st)
    return context, fake.requests[before:]


async def test_requests_under_a_grammar_carry_it_from_the_answers_tokens(fake, tok_dir, vocab):
    engine = await make("remote", fake, tok_dir)
    assert not engine.constrains  # the fake runs no grammar processor: the probe says so
    engine.constrains = True  # as against a vLLM that runs it
    grammar = MemberGrammar(vocab, ANY_TEXT)
    context, sent = await step(engine, fake, "grammar", Sampling(constraint=grammar))
    kinds = {
        "stream"
        if r["stream"]
        else "score"
        if "prompt_logprobs" in r["sampling_params"]
        else "continue"
        for r in sent
    }
    assert kinds == {"stream", "score", "continue"}, sent
    for r in sent:
        arg = r["sampling_params"]["extra_args"][GRAMMAR_ARG]
        assert arg["grammar"] == grammar.grammar and arg["eos"] == [END]
        # the processor's matcher starts after what the prompt holds of the answer: the
        # committed tokens, then the candidate or look-ahead the request carries
        assert arg["before"] == r["token_ids"][len(context) :] and arg["before"][:2] == [
            fake.words[6],
            fake.words[7],
        ]


async def test_without_a_grammar_or_a_processor_no_request_changes(fake, tok_dir, vocab):
    engine = await make("remote", fake, tok_dir)
    _, plain = await step(engine, fake, "plain", Sampling())
    # a grammar but no processor: the engine only checks its tokens (``take``)
    _, unconstrained = await step(
        engine, fake, "no-processor", Sampling(constraint=MemberGrammar(vocab, ANY_TEXT))
    )
    for r in plain + unconstrained:
        assert "extra_args" not in r["sampling_params"]
    assert [r["token_ids"] for r in plain] == [r["token_ids"] for r in unconstrained]


def test_the_processor_refuses_a_malformed_argument():
    assert request_grammar(None) is None and request_grammar({"other": 1}) is None
    ok = probe_fields([END])["extra_args"]
    assert request_grammar(ok).eos == (END,)
    for bad in (
        {"grammar": 3},
        {**ok[GRAMMAR_ARG], "before": [1, -2]},
        {**ok[GRAMMAR_ARG], "eos": "2"},
    ):
        with pytest.raises(ValueError, match=GRAMMAR_ARG):
            request_grammar({GRAMMAR_ARG: bad})
