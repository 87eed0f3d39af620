"""The grammar processor against vLLM's V1 logits-processor interface, driven as vLLM's
model runner drives it (``BatchUpdate``s of added, moved and removed requests, the output
lists it fills in place, ``apply`` on a batch of logits), without starting vLLM. Its masks
are the loop's own ``MemberGrammar`` masks (SmolLM2's tokens); vLLM running it:
test_vllm_engine.py and tests/integration/test_vllm_remote_grammar.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from fusion.engines.vllm_grammar import grammar_fields
from fusion.engines.vllm_grammar_processor import GrammarLogitsProcessor
from fusion.grammar import GrammarSpec, MemberGrammar, Vocabularies

END = 2  # SmolLM2's end token
CODE = GrammarSpec("regex", r"(abc|xyz)-[0-9]{2}")
PAD = 7  # logits rows are wider than the vocabulary (padded): those ids are never allowed


@pytest.fixture(scope="module")
def vocab(tokenizer):
    return Vocabularies().get("smollm2", tokenizer.to_str, frozenset({END}))


@pytest.fixture(scope="module")
def ids(tokenizer):
    return lambda text: tokenizer.encode(text, add_special_tokens=False).ids


@pytest.fixture
def processor(tok_dir):
    model = SimpleNamespace(
        tokenizer=str(tok_dir), tokenizer_revision=None, trust_remote_code=False
    )
    return GrammarLogitsProcessor(SimpleNamespace(model_config=model), torch.device("cpu"), False)


def params(before: list[int], spec: GrammarSpec = CODE) -> SamplingParams:
    return SamplingParams(**grammar_fields(spec.compiled, [END], before))


def want(vocab, before: list[int], output: list[int] = ()) -> torch.Tensor:
    """Which ids the loop's grammar allows after ``before`` and ``output``."""
    g = MemberGrammar(vocab, CODE)
    g.commit([*before, *output])
    return torch.from_numpy(g.allowed(g.vocab + PAD))


def masked(processor, vocab, batch: int) -> torch.Tensor:
    logits = processor.apply(torch.zeros(batch, vocab.vocab_size + PAD))
    return torch.isfinite(logits)


def update(batch: int, added=(), removed=(), moved=()) -> BatchUpdate:
    return BatchUpdate(
        batch_size=batch, removed=list(removed), added=list(added), moved=list(moved)
    )


def test_masks_follow_each_request_through_the_batch(processor, ids, vocab):
    a_out: list[int] = []
    c_before = ids("x") + ids("y")  # another model's text, split where its tokens ended
    processor.update_state(
        update(
            3,
            added=[
                (0, params([]), [5, 6], a_out),
                (1, SamplingParams(), [5, 6], []),  # no grammar: its row is left alone
                (2, params(c_before), [5, 6], []),
            ],
        )
    )
    assert not processor.is_argmax_invariant()
    rows = masked(processor, vocab, 3)
    assert torch.equal(rows[0], want(vocab, [])) and torch.equal(rows[2], want(vocab, c_before))
    assert rows[1].all() and not rows[0][-PAD:].any()
    # vLLM samples for request A (it appends to the list it handed over)
    a_out += ids("ab")
    rows = masked(processor, vocab, 3)
    assert torch.equal(rows[0], want(vocab, [], a_out))
    # A and C swap places, B leaves: masks move with their requests
    processor.update_state(update(2, removed=[1], moved=[(0, 2, MoveDirectionality.SWAP)]))
    rows = masked(processor, vocab, 3)
    assert torch.equal(rows[0], want(vocab, c_before)) and torch.equal(
        rows[2], want(vocab, [], a_out)
    )
    assert rows[1].all()


def test_a_resumed_request_follows_its_output_and_waits_for_placeholders(processor, ids, vocab):
    output = [*ids("abc-"), -1]  # preempted and re-added; async scheduling's placeholder
    processor.update_state(update(1, added=[(0, params([]), [5], output)]))
    rows = masked(processor, vocab, 1)
    assert torch.equal(rows[0], want(vocab, [], ids("abc-")))
    output[-1:] = ids("4")  # vLLM fills the placeholder before the next apply
    rows = masked(processor, vocab, 1)
    assert torch.equal(rows[0], want(vocab, [], ids("abc-4")))


def test_requests_outside_their_grammar_are_left_unconstrained(processor, ids, vocab, caplog):
    drifted: list[int] = []
    processor.update_state(
        update(
            2,
            added=[
                (0, params(ids("abd")), [5], []),  # the answer so far is not in the grammar
                (1, params([]), [5], drifted),
            ],
        )
    )
    drifted += ids("q")  # a token the grammar never allowed (vLLM could not follow it)
    rows = masked(processor, vocab, 2)
    assert rows.all()
    assert len([r for r in caplog.records if "unconstrained" in r.getMessage()]) == 2
