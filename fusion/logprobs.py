"""Per-token log-probs of a source model served alone (OpenAI's ``logprobs``): the
prompt's, for completions' ``echo``, and each segment's, as the loop commits it.

Token ids and their log-probs belong to one vocabulary, so only a run of one model
reports them (the server refuses them for the fused model). A segment's tokens are the
ones its model wrote, with the log-probs and most likely tokens ``generate`` reported at
each (look-ahead it replays included). Where the committed text is not exactly tokens
it wrote (a cut inside a token, a grammar's cut, a turn marker written as text), they
are the text's own tokens, as they are committed, scored after the context by
``score_top`` (whose branch that commit then takes over, where the engine keeps one).
"""

from __future__ import annotations

from collections.abc import Sequence

from fusion.engine import TopLogprobs
from fusion.members import Members
from fusion.models import SourceModel
from fusion.run import Candidate, FusionError, Run
from fusion.steps import score_prompts
from fusion.types import TokenLogprob


def _alone(run: Run) -> SourceModel:
    if len(run.models) != 1:
        raise FusionError("token log-probs are reported for one source model alone")
    return run.models[0]


async def prompt_logprobs(members: Members, run: Run) -> tuple[TokenLogprob, ...]:
    """The prompt's tokens: the first with no log-prob (it follows nothing, as in vLLM),
    each other with its log-prob and the ``prompt_logprobs`` most likely tokens there."""
    m = _alone(run)
    top = run.params.prompt_logprobs or 0
    ids, lps, tops = (await score_prompts(members, run, top))[m.name]
    run.outcome.usage[m.name].prompt_tokens = len(ids)
    return (TokenLogprob(ids[0], None), *_tokens(ids[1:], lps, tops)) if ids else ()


async def segment_logprobs(members: Members, run: Run, win: Candidate) -> tuple[TokenLogprob, ...]:
    """The winning candidate's tokens, before it is committed (module docstring)."""
    m = _alone(run)
    top = run.params.logprobs or 0
    for p in win.proposals:
        if p.model == m.name and p.own_ids is not None and p.own_logprobs is not None:
            if top and p.own_top is None:
                break
            return _tokens(p.own_ids, p.own_logprobs, p.own_top or ())

    async def score(model: SourceModel) -> tuple[TokenLogprob, ...]:
        ids = run.encode(model.name, win.text) if win.text else []
        lps, tops = await model.engine.score_top(run.states[model.name], ids, top)
        run.outcome.usage[model.name].scored_tokens += len(ids)
        return _tokens(ids, lps, tops if top else ())

    units = len(run.encode(m.name, win.text)) if win.text else 1
    return (await members.each(run, score, kind="score", units=units))[m.name]


def _tokens(
    ids: Sequence[int], lps: Sequence[float], tops: Sequence[TopLogprobs]
) -> tuple[TokenLogprob, ...]:
    """Tokens with their log-probs, and their tops where given (none: empty)."""
    return tuple(
        TokenLogprob(t, lp, tops[j] if tops else ()) for j, (t, lp) in enumerate(zip(ids, lps))
    )
