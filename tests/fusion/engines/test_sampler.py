"""The request's logit processors in the samplers of the engines that pick their own
tokens (llama.cpp's ``_pick``, ``TransformersEngine._pick``), on crafted logits: each
penalty, the bias, top_k and min_p move the pick as OpenAI and vLLM define them, and
their off values move nothing. No model: the states are real, their rows are made here.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

from fusion.engine import Sampling
from fusion.engines.kv_arena import ArenaCache
from fusion.engines.llamacpp_engine import _pick as llama_pick
from fusion.engines.llamacpp_runtime import log_softmax
from fusion.engines.llamacpp_state import LlamaState
from fusion.engines.sampler import History, shaped_logits, top_of, with_shift
from fusion.engines.transformers_engine import TransformersEngine
from fusion.engines.transformers_state import TransformersState

V = 12  # vocabulary of the crafted rows


class Llama:
    """llama.cpp's rows: numpy log-probs from ``log_softmax`` (which keeps the shift)."""

    @staticmethod
    def state(prompt: list[int]) -> Any:
        return LlamaState.opened("r", prompt)

    @staticmethod
    def row(logits: list[float]) -> Any:
        return log_softmax(np.asarray(logits, dtype=np.float32))

    @staticmethod
    def masked(row: Any, allowed: list[int]) -> Any:
        out = np.full(len(row), -np.inf, dtype=np.float32)  # a plain copy, as grammars make
        out[allowed] = np.asarray(row)[allowed]
        return out

    pick = staticmethod(llama_pick)


class Torch:
    """transformers' rows: torch log-probs carrying their shift (as ``_row`` makes them)."""

    @staticmethod
    def state(prompt: list[int]) -> Any:
        return TransformersState.opened("r", ArenaCache(1), list(prompt))

    @staticmethod
    def row(logits: list[float]) -> Any:
        t = torch.tensor(logits, dtype=torch.float32)
        return with_shift(torch.log_softmax(t, -1), float(torch.logsumexp(t, -1)))

    @staticmethod
    def masked(row: Any, allowed: list[int]) -> Any:
        out = torch.full((len(row),), float("-inf"))
        out[allowed] = row[allowed]
        return out

    pick = staticmethod(TransformersEngine._pick)


ENGINES = pytest.mark.parametrize("eng", [Llama, Torch], ids=["llamacpp", "transformers"])


def logits(*top: float, rest: float = -4.0) -> list[float]:
    """A row whose first tokens have the logits ``top``, every other one ``rest``."""
    return [*top, *[rest] * (V - len(top))]


def at(eng: Any, row_logits: list[float], prompt=(9,), answer=(), ahead=()) -> tuple[Any, Any]:
    """A state after ``prompt``, a committed ``answer`` and this call's ``ahead`` tokens,
    whose tail (where the next token is picked) is ``row_logits``."""
    st = eng.state(list(prompt))
    book = st.book
    if answer:
        st.book.commit(list(answer))
    book.decoded_pending(None)
    for tok in ahead:
        book.push(tok, 0.0)
    row = eng.row(row_logits)
    book.fed_ahead(row)
    return st, row


def pick(eng: Any, row_logits: list[float], sampling: Sampling, **where: Any) -> int:
    st, row = at(eng, row_logits, **where)
    return int(eng.pick(st, row, sampling))


def draws(eng: Any, row_logits: list[float], sampling: Sampling, n: int = 300) -> Counter[int]:
    st, row = at(eng, row_logits)
    return Counter(int(eng.pick(st, row, sampling)) for _ in range(n))


@ENGINES
def test_off_values_change_no_pick(eng):
    rng = np.random.default_rng(0)
    row = [float(x) for x in rng.normal(0, 3, V)]
    off = dict(
        presence_penalty=0.0,
        frequency_penalty=0.0,
        repetition_penalty=1.0,
        min_p=0.0,
        logit_bias=(),
    )
    seen = dict(prompt=(1, 2, 3), answer=(4, 4, 5), ahead=(6,))
    assert pick(eng, row, Sampling(**off, top_k=-1), **seen) == int(np.argmax(row))
    for top_k in (0, -1):
        plain, shaped = at(eng, row, **seen), at(eng, row, **seen)
        a = [eng.pick(plain[0], plain[1], Sampling(temperature=1.0, seed=5)) for _ in range(40)]
        b = [
            eng.pick(shaped[0], shaped[1], Sampling(temperature=1.0, seed=5, top_k=top_k, **off))
            for _ in range(40)
        ]
        assert a == b and len(set(a)) > 1


@ENGINES
def test_greedy_with_a_presence_penalty_takes_the_argmax_after_it(eng):
    row = logits(5.0, 4.5)
    assert pick(eng, row, Sampling(presence_penalty=1.0)) == 0  # token 0 not in the answer
    # the answer so far: committed tokens and this call's, never the prompt
    assert pick(eng, row, Sampling(presence_penalty=1.0), answer=(0,)) == 1
    assert pick(eng, row, Sampling(presence_penalty=1.0), ahead=(0,)) == 1
    assert pick(eng, row, Sampling(presence_penalty=1.0), prompt=(0, 0, 0)) == 0
    # presence counts once: three more occurrences move nothing more
    assert pick(eng, logits(5.0, 3.5), Sampling(presence_penalty=1.0), answer=(0, 0, 0)) == 0
    # negative: more of the same
    assert pick(eng, logits(4.5, 5.0), Sampling(presence_penalty=-1.0), answer=(0,)) == 0


@ENGINES
def test_frequency_penalty_scales_with_the_count(eng):
    row = logits(5.0, 4.5)
    f = Sampling(frequency_penalty=0.2)
    assert pick(eng, row, f, answer=(0, 0)) == 0  # 0.4 < 0.5
    assert pick(eng, row, f, answer=(0, 0), ahead=(0,)) == 1  # 0.6 > 0.5
    assert pick(eng, row, f, prompt=(0, 0, 0, 0)) == 0


@ENGINES
def test_repetition_penalty_divides_positive_logits_and_multiplies_negative_ones(eng):
    p = Sampling(repetition_penalty=1.3)
    # positive: 1.0 / 1.3 = 0.77 stays above 0.6
    assert pick(eng, logits(1.0, 0.6), p, prompt=(0,)) == 0
    # the same log-probs from logits 3 lower: -2.0 * 1.3 = -2.6 falls below -2.4
    assert pick(eng, logits(-2.0, -2.4, rest=-7.0), p, prompt=(0,)) == 1
    # prompt and answer both count; an unseen token is left alone
    assert pick(eng, logits(-2.0, -2.4, rest=-7.0), p, answer=(0,)) == 1
    assert pick(eng, logits(-2.0, -2.4, rest=-7.0), p, ahead=(0,)) == 1
    assert pick(eng, logits(-2.0, -2.4, rest=-7.0), p, prompt=(5,)) == 0


@ENGINES
def test_logit_bias_moves_the_pick(eng):
    row = logits(5.0, 4.5)
    assert pick(eng, row, Sampling(logit_bias=((3, 100.0),))) == 3
    assert pick(eng, row, Sampling(logit_bias=((0, -100.0),))) == 1
    assert pick(eng, row, Sampling(logit_bias=((1, 0.4),))) == 0
    assert pick(eng, row, Sampling(logit_bias=((1, 0.6),))) == 1


@ENGINES
def test_top_k_keeps_the_k_most_likely_tokens(eng):
    row = logits(2.0, 1.8, 1.6, 1.4, rest=1.0)
    assert set(draws(eng, row, Sampling(temperature=1.0, seed=1, top_k=1))) == {0}
    got = draws(eng, row, Sampling(temperature=1.0, seed=1, top_k=3))
    assert set(got) == {0, 1, 2}
    assert len(draws(eng, row, Sampling(temperature=1.0, seed=1))) == V


@ENGINES
def test_min_p_keeps_tokens_within_a_factor_of_the_top_one_after_temperature(eng):
    # probabilities at temperature 1 relative to the top one: 1, 0.6, 0.3, 0.1, ...
    row = logits(0.0, float(np.log(0.6)), float(np.log(0.3)), float(np.log(0.1)), rest=-9.0)
    assert set(draws(eng, row, Sampling(temperature=1.0, seed=2, min_p=0.4))) == {0, 1}
    # temperature 3 flattens them to 1, 0.84, 0.67, 0.46: all four pass
    assert set(draws(eng, row, Sampling(temperature=3.0, seed=2, min_p=0.4))) == {0, 1, 2, 3}


@ENGINES
def test_a_grammars_masked_copy_of_the_tail_keeps_its_logits(eng):
    st, row = at(eng, logits(-2.0, -2.4, -2.5, rest=-7.0), prompt=(0,))
    masked = eng.masked(row, [0, 1, 2])  # without the tail's shift: it is taken from the tail
    assert int(eng.pick(st, masked, Sampling(repetition_penalty=1.3))) == 1
    assert int(eng.pick(st, eng.masked(row, [0, 2]), Sampling(repetition_penalty=1.3))) == 2


def test_history_counts_the_answer_as_the_ledger_moves():
    """Pushes, commits of its own tokens and of others', dropped look-ahead: the counts
    kept by ``History`` always equal a recount of the answer so far."""
    rnd = random.Random(3)
    st = Llama.state([1, 2, 3])
    book, history = st.book, History()
    book.decoded_pending(None)
    for _ in range(400):
        op = rnd.random()
        if op < 0.6 or not book.ahead:
            if book.pending:
                book.decoded_pending(None)
            book.push(rnd.randrange(V), 0.0)
        elif op < 0.75:
            book.commit(book.ahead[: rnd.randint(1, len(book.ahead))])
        elif op < 0.9:
            book.commit([rnd.randrange(V) for _ in range(rnd.randint(1, 3))])
        else:
            book.clear_ahead()
        got = history.sync(book, V)
        want = np.bincount(book.ids[book.prompt_len :] + book.ahead, minlength=V)
        assert list(got) == list(want)


def test_penalties_are_vllms():
    """The same logits, prompt and answer through vLLM's own ``apply_penalties``."""
    pytest.importorskip("vllm")
    from vllm.model_executor.layers.utils import apply_penalties

    rng = np.random.default_rng(4)
    for case in range(20):
        raw = rng.normal(0, 3, V).astype(np.float32)
        prompt = list(rng.integers(0, V, 4))
        answer = list(rng.integers(0, V, int(rng.integers(0, 6))))
        s = Sampling(
            presence_penalty=float(rng.uniform(-2, 2)),
            frequency_penalty=float(rng.uniform(-2, 2)),
            repetition_penalty=float(rng.uniform(0.5, 2)),
        )
        st, row = at(Llama, list(raw), prompt=prompt, answer=answer)
        ours = shaped_logits(row, s, st.book, st.history, float(row.shift))
        theirs = apply_penalties(
            torch.tensor(raw)[None],
            torch.tensor([prompt]),
            torch.tensor([answer or [V]]),  # V: vLLM's padding id
            torch.tensor([s.presence_penalty]),
            torch.tensor([s.frequency_penalty]),
            torch.tensor([s.repetition_penalty]),
        )[0]
        assert ours is not None
        # float32 logits recovered from float32 log-probs: a few ulps of |logit| <= 12
        np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-5, err_msg=f"case {case}")


@ENGINES
def test_top_of_a_row_is_its_most_likely_tokens_first(eng):
    row = eng.row(logits(0.5, 3.0, -1.0, 2.0))
    top = top_of(row, 3)
    assert [t for t, _ in top] == [1, 3, 0]
    assert [lp for _, lp in top] == pytest.approx([float(row[t]) for t in (1, 3, 0)])
    assert top_of(row, 0) == () and len(top_of(row, V + 5)) == V
