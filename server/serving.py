"""From OpenAI requests to fusion runs: validation against the loaded models, jobs,
running their choices (concurrently) and the stream of their chunks.

Only this layer and ``server/jobs.py`` know both sides: the fusion loop yields
``Segment``s with provenance; ``jobs`` turns them into ``chat.completion`` /
``text_completion`` objects and stream chunks (one chunk per selected segment).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Coroutine
from dataclasses import replace
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fusion.answers import extractor
from fusion.engine import Sampling
from fusion.grammar import GrammarSpec
from fusion.loop import Fuser, FusionError
from fusion.members import unavailable
from fusion.models import SourceModel
from fusion.tools import ToolCall
from fusion.types import (
    RERANKING,
    FusionParams,
    Prompt,
    Segment,
    SelectionPolicy,
    VoteParams,
    reranks_alone,
)
from server import request_fields
from server.config import EXTRACTOR_LIST, AppConfig, SelectionConfig, VariantConfig
from server.errors import BadRequest, ContextLengthExceeded, ModelNotFound, Unavailable
from server.jobs import Choice, Job, chunk, tool_call_chunk, tool_calls
from server.logprobs import LogprobsAsk, TokenTexts
from server.metrics import Metrics
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FusionOptions,
    SelectionOptions,
)
from server.request_fields import refuse_unhonoured
from server.structured import grammar_of
from server.tool_calls import tool_plan

log = logging.getLogger(__name__)


M = TypeVar("M", bound=BaseModel)


def _over(base: M, asked: dict[str, Any], where: str) -> M:
    """``base``'s settings with a request's ``asked`` ones on top, checked: a 400 naming
    the first invalid field under ``where``."""
    try:
        return type(base).model_validate(base.model_dump() | asked)
    except ValidationError as exc:
        field = exc.errors()[0]["loc"][:1]
        raise BadRequest(_first_error(exc), param=".".join([where, *map(str, field)])) from None


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])


class FusionService:
    """Validates requests against the loaded models and runs them through the fuser."""

    def __init__(self, config: AppConfig, models: list[SourceModel], metrics: Metrics) -> None:
        self.config = config
        self.models = {m.name: m for m in models}
        self.fuser = Fuser(
            models,
            window_pieces=config.fusion.window_pieces,
            faults=config.fusion.faults.policy(),
            listener=metrics.fault,
        )
        self.metrics = metrics
        self.token_texts: dict[str, TokenTexts] = {}  # per model, made when first asked

    # -- catalogue ------------------------------------------------------------------------
    def model_cards(self) -> list[dict[str, Any]]:
        created = int(time.time())
        cfg = self.config.fusion
        fused = cfg.name
        cards = []
        for name in (fused, *cfg.variants):
            variant = cfg.variants.get(name)
            card: dict[str, Any] = {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "fusion-server",
                "fusion": {
                    "sources": self._sources(name),
                    "method": cfg.variant_method(name),
                    "selection": cfg.variant_selection(name).rule,
                },
            }
            if card["fusion"]["method"] == "vote":
                card["fusion"]["answer"] = cfg.variant_vote(name)[0]
            if variant is not None:
                card["parent"] = fused
                if variant.description:
                    card["fusion"]["description"] = variant.description
            cards.append(card)
        for name, m in self.models.items():
            cards.append(
                {
                    "id": name,
                    "object": "model",
                    "created": created,
                    "owned_by": "fusion-server",
                    "parent": fused,
                    "max_model_len": m.max_model_len or None,
                }
            )
        return cards

    def model_card(self, model_id: str) -> dict[str, Any]:
        for card in self.model_cards():
            if card["id"] == model_id:
                return card
        raise ModelNotFound(f"The model `{model_id}` does not exist.", param="model")

    # -- request -> job -------------------------------------------------------------------
    def _params(
        self,
        model: str,
        opts: FusionOptions | None,
        max_tokens: int | None,
        stop: tuple[str, ...],
        sampling: Sampling,
        grammar: GrammarSpec | None = None,
    ) -> FusionParams:
        opts = opts or FusionOptions()
        cfg = self.config.fusion
        if self.is_fused(model):
            variant = cfg.variants.get(model) or VariantConfig()
            subset = tuple(opts.models or cfg.variant_models(model) or ()) or None
            unknown = [n for n in subset or () if n not in self.models]
            if unknown:
                raise BadRequest(
                    f"unknown source models: {', '.join(unknown)}", param="fusion.models"
                )
            method = opts.method or cfg.variant_method(model)
            members = subset or self._sources(model)
            if reranks_alone(method, members):
                asked = f"fusion.method {method}" if opts.method else f"`{model}`'s method {method}"
                more = ", or name more in fusion.models" if len(self.models) > 1 else ""
                raise BadRequest(
                    f"{asked} reranks the answers of two or more source models; this "
                    f"request has one ({members[0]}): use cool{more}",
                    param="fusion.models" if opts.models else "fusion.method",
                )
            segment = opts.max_segment_tokens or variant.max_segment_tokens
            ppl_mode = opts.ppl_mode or variant.ppl_mode
            base = cfg.variant_selection(model)
            vote = self._vote(model, opts, method, subset)
        elif model in self.models:
            if opts.models and opts.models != [model]:
                raise BadRequest(
                    "fusion.models only applies to the fused model", param="fusion.models"
                )
            if opts.method in RERANKING:
                raise BadRequest(
                    f"fusion.method {opts.method} is not supported for a source model by "
                    f"name (`{model}`): it reranks the fused model's whole answers; use "
                    f"cool, cool_shortest or vote (its own self-consistency), or send it "
                    f"to the fused model `{cfg.name}`",
                    param="fusion.method",
                )
            # alone it writes its own segments, or votes on its own samples
            subset, method = (model,), opts.method or "cool"
            segment, ppl_mode, base = opts.max_segment_tokens, opts.ppl_mode, cfg.selection
            vote = self._vote(model, opts, method, subset)
        else:
            raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
        wanted = cfg.default_max_tokens if max_tokens is None else max_tokens
        if wanted > self.config.server.max_tokens_cap:
            raise BadRequest(
                f"max_tokens is {wanted}; this server allows at most "
                f"{self.config.server.max_tokens_cap}",
                param="max_tokens",
            )
        return FusionParams(
            method=method,
            max_tokens=wanted,
            stop=stop,
            max_segment_tokens=segment or cfg.max_segment_tokens,
            ppl_mode=ppl_mode or cfg.ppl_mode,
            models=subset,
            sampling=sampling,
            selection=self._selection(base, opts.selection),
            grammar=grammar,
            grammar_scores=opts.grammar_scores or "raw",
            vote=vote,
        )

    def _vote(
        self, model: str, opts: FusionOptions, method: str, subset: tuple[str, ...] | None
    ) -> VoteParams:
        """The model's extractor and vote settings with the request's on top, checked;
        method vote needs an extractor, and the fields only other methods read are
        refused under it (and its own under them)."""
        answer, settings = self.config.fusion.variant_vote(model)
        if method != "vote":
            for name in ("answer", "vote"):
                if getattr(opts, name) is not None:
                    raise BadRequest(
                        f"fusion.{name} applies to method vote only (this request's method "
                        f"is {method})",
                        param=f"fusion.{name}",
                    )
            return settings.params(answer)
        if opts.max_segment_tokens is not None:
            raise BadRequest(
                "fusion.max_segment_tokens does not apply to method vote (whole answers)",
                param="fusion.max_segment_tokens",
            )
        unread = (
            sorted(set(opts.selection.model_fields_set) - {"leader", "weights"})
            if (opts.selection is not None)
            else []
        )
        if unread:
            raise BadRequest(
                f"method vote reads only fusion.selection.leader and weights, not "
                f"{', '.join(unread)}",
                param=f"fusion.selection.{unread[0]}",
            )
        if opts.answer is not None:
            try:
                extractor(opts.answer)
            except ValueError as exc:
                raise BadRequest(str(exc), param="fusion.answer") from None
            answer = opts.answer
        if opts.vote is not None:
            # given fields only: an explicit null seed asks for fresh samples
            asked = opts.vote.model_dump(exclude_unset=True)
            settings = _over(settings, asked, "fusion.vote")
        if answer is None:
            raise BadRequest(
                f"method vote needs an answer extractor in fusion.answer: one of {EXTRACTOR_LIST}",
                param="fusion.answer",
            )
        return settings.params(answer)

    def _selection(self, base: SelectionConfig, asked: SelectionOptions | None) -> SelectionPolicy:
        """The model's selection settings with the request's on top, checked."""
        if asked is None:
            return base.policy()
        chosen = _over(base, asked.model_dump(exclude_none=True), "fusion.selection")
        for problem in chosen.problems(list(self.models)):
            field_name = problem.split(":", 1)[0]
            raise BadRequest(problem, param=f"fusion.{field_name}")
        return chosen.policy()

    def _sampling(self, req: ChatCompletionRequest | CompletionRequest) -> Sampling:
        return Sampling(
            temperature=req.temperature or 0.0,
            top_p=req.top_p or 1.0,
            seed=req.seed,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=req.repetition_penalty or 1.0,
            top_k=max(req.top_k or 0, 0),
            min_p=req.min_p or 0.0,
            logit_bias=self._logit_bias(req),
        )

    def _logit_bias(
        self, req: ChatCompletionRequest | CompletionRequest
    ) -> tuple[tuple[int, float], ...]:
        """The request's biases, for a source model served alone: token ids are one
        vocabulary's, and a fused answer is written in several."""
        bias = req.logit_bias_pairs()
        if not bias:
            return ()
        if self.is_fused(req.model):
            raise BadRequest(
                f"logit_bias is not supported for the fused model `{req.model}`: its token "
                "ids would name different tokens in each source model's vocabulary; send "
                f"it to one source model by name ({', '.join(self.models)})",
                param="logit_bias",
            )
        model = self.models.get(req.model)
        if model is None:
            return bias  # no such model: a 404 comes next
        size = model.tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)
        outside = [t for t, _ in bias if t >= size]
        if outside:
            raise BadRequest(
                f"logit_bias: token id {outside[0]} is outside {model.name}'s vocabulary "
                f"of {size} tokens",
                param="logit_bias",
            )
        return bias

    def is_fused(self, model: str) -> bool:
        """Whether ``model`` names the fused model or one of its variants."""
        return model == self.config.fusion.name or model in self.config.fusion.variants

    def _sources(self, fused: str) -> list[str]:
        """The source models the fused model or a variant uses when a request names none."""
        return self.config.fusion.variant_models(fused) or list(self.models)

    def _logprobs(
        self, req: ChatCompletionRequest | CompletionRequest, top: int | None
    ) -> LogprobsAsk | None:
        """What ``logprobs`` asks of a source model alone (None: not asked). A fused
        answer is written in several vocabularies' tokens: a 400 naming who can answer."""
        if top is None:
            return None
        if self.is_fused(req.model):
            raise BadRequest(
                f"logprobs is not supported for the fused model `{req.model}`: its answer is "
                "written in the tokens of several tokenizers, one per source model, so no "
                "single token distribution gives its log-probs; each source model answers "
                f"with logprobs when asked by name: {', '.join(self._sources(req.model))}",
                param="logprobs",
            )
        model = self.models.get(req.model)
        if model is None:
            return None  # no such model: a 404 comes next
        texts = self.token_texts.setdefault(model.name, TokenTexts(model.tokenizer))
        return LogprobsAsk(texts, top, chat=isinstance(req, ChatCompletionRequest))

    def _check_choices(self, prompts: int, n: int) -> None:
        cap = self.config.server.max_choices
        if prompts * n > cap:
            asked = f"{prompts} prompts × n={n}" if prompts > 1 else f"n={n}"
            raise BadRequest(
                f"this request asks for {prompts * n} choices ({asked}); this server allows "
                f"at most {cap} per request",
                param="n",
            )

    def _fit_context(self, prompt: Prompt, params: FusionParams, explicit: bool) -> FusionParams:
        """Check the prompt in every source model's own tokens against its context length
        (an engine may not check, and each tokenizer counts differently), as vLLM does: an
        explicit ``max_tokens`` must fit after the prompt; without one the prompt must leave
        room for at least one token, and the default is cut to the room left."""
        room = params.max_tokens
        for m in self.fuser.select(params.models):
            limit = m.max_model_len
            if not limit:
                continue
            n = len(
                m.chat_prompt_ids(prompt.messages, prompt.tools)
                if prompt.messages is not None
                else m.completion_prompt_ids(prompt.text or "")
            )
            where = "messages" if prompt.is_chat else "prompt"
            head = f"This model's maximum context length is {limit} tokens (source model {m.name})."
            if explicit and n + params.max_tokens > limit:
                raise ContextLengthExceeded(
                    f"{head} However, you requested {n + params.max_tokens} tokens ({n} in "
                    f"the {where}, {params.max_tokens} for the completion). Please reduce "
                    f"the length of the {where} or of max_tokens.",
                    param=where,
                )
            if n >= limit:
                raise ContextLengthExceeded(
                    f"{head} However, the {where} alone is {n} tokens, which leaves no room "
                    f"for the completion. Please reduce the length of the {where}.",
                    param=where,
                )
            room = min(room, limit - n)
        return params if room == params.max_tokens else replace(params, max_tokens=room)

    def _choices(
        self, prompts: list[Prompt], n: int, params: FusionParams, explicit: bool, echo: bool
    ) -> list[Choice]:
        """``n`` choices per prompt; with a seed, each choice of a prompt samples with its
        own (the request's seed for the first), so they differ yet repeat per request."""
        # the loop gives each source model seed + its index (and each vote sample of it
        # seed + index + sample * models); a stride of that many keeps every (choice,
        # model, sample) seed distinct
        stride = len(self.fuser.select(params.models))
        if params.method == "vote":
            stride *= params.vote.budget
        sampling, vote = params.sampling, params.vote
        choices: list[Choice] = []
        for p_index, prompt in enumerate(prompts):
            fitted = self._fit_context(prompt, params, explicit)
            for j in range(n):
                own = fitted
                if sampling.seed is not None and j:
                    own = replace(
                        fitted, sampling=replace(sampling, seed=sampling.seed + j * stride)
                    )
                elif vote.seed is not None and j and params.method == "vote":
                    own = replace(fitted, vote=replace(vote, seed=vote.seed + j * stride))
                text = prompt.text if echo and prompt.text else ""
                choices.append(Choice(len(choices), prompt, own, p_index, text))
        return choices

    def chat_job(self, req: ChatCompletionRequest) -> Job:
        refuse_unhonoured(req, request_fields.CHAT)
        if req.top_logprobs and not req.logprobs:  # as vLLM
            raise BadRequest("top_logprobs needs logprobs set to true", param="top_logprobs")
        logprobs = self._logprobs(req, (req.top_logprobs or 0) if req.logprobs else None)
        try:
            messages = tuple(m.core() for m in req.messages)
        except ValueError as exc:
            raise BadRequest(str(exc), param="messages") from None
        self._check_choices(1, req.n or 1)
        tools = tool_plan(req)
        grammar = grammar_of(req.response_format, req.structured_outputs)
        if grammar is not None and tools.grammar is not None:
            raise BadRequest(
                "a response format and tool calls cannot both shape the answer; "
                'use tool_choice "none" with response_format',
                param="tool_choice",
            )
        params = self._params(
            req.model,
            req.fusion,
            req.max_new(),
            req.stop_list(),
            self._sampling(req),
            grammar or tools.grammar,
        )
        if logprobs is not None:
            params = replace(params, logprobs=logprobs.top)
        prompt = Prompt(messages=messages, tools=tools.tools)
        choices = self._choices([prompt], req.n or 1, params, req.max_new() is not None, False)
        job = self._job("chat", req, choices)
        job.tool_mode = tools.mode
        job.tool_names = tuple(t["function"]["name"] for t in tools.tools or ())
        job.logprobs = logprobs
        return job

    def completion_job(self, req: CompletionRequest) -> Job:
        refuse_unhonoured(req, request_fields.COMPLETIONS)
        logprobs = self._logprobs(req, req.logprobs)
        if req.max_tokens == 0:  # as vLLM: the prompt alone, echoed (lm-eval's scoring)
            self._prompt_alone(req)
        if req.suffix:
            raise BadRequest("suffix is not supported", param="suffix")
        try:
            prompts = req.prompts()
        except ValueError as exc:
            raise BadRequest(str(exc), param="prompt") from None
        self._check_choices(len(prompts), req.n or 1)
        params = self._params(
            req.model,
            req.fusion,
            req.max_tokens,
            req.stop_list(),
            self._sampling(req),
            grammar_of(req.response_format, req.structured_outputs),
        )
        if logprobs is not None:
            params = replace(
                params, logprobs=logprobs.top, prompt_logprobs=logprobs.top if req.echo else None
            )
        choices = self._choices(
            [Prompt(text=t) for t in prompts],
            req.n or 1,
            params,
            req.max_tokens is not None,
            bool(req.echo),
        )
        job = self._job("text", req, choices)
        job.logprobs = logprobs
        return job

    def _prompt_alone(self, req: CompletionRequest) -> None:
        """``max_tokens`` 0 asks for no answer: accepted with ``echo``, for a source model
        (its prompt's log-probs alone, with ``logprobs``)."""
        if not req.echo:
            raise BadRequest(
                "max_tokens must be at least 1, or 0 with echo (the prompt alone)",
                param="max_tokens",
            )
        if self.is_fused(req.model):
            raise BadRequest(
                "max_tokens 0 (the prompt alone, with echo) is for a source model by name: "
                f"{', '.join(self._sources(req.model))}",
                param="max_tokens",
            )

    def _job(
        self, kind: str, req: ChatCompletionRequest | CompletionRequest, choices: list[Choice]
    ) -> Job:
        opts = req.stream_options
        return Job(
            kind,
            req.model,
            choices,
            bool(req.stream),
            bool(opts and opts.include_usage),
            bool(req.fusion and req.fusion.trace),
            single=len(self.fuser.select(choices[0].params.models)) == 1,
        )

    # -- running --------------------------------------------------------------------------
    async def segments(self, job: Job, choice: Choice) -> AsyncGenerator[Segment, None]:
        run = self.fuser.run(choice.prompt, choice.params, choice.outcome)
        async with contextlib.aclosing(run) as segments:
            async for seg in segments:
                choice.segments.append(seg)
                self.metrics.segment(
                    job.model, choice.params.method, seg, choice.params.selection.rule
                )
                yield seg
        self.metrics.outcome(job.model, choice.params.method, choice.outcome)

    def log_done(self, job: Job, seconds: float, status: str) -> None:
        """One line per request; prompt and completion text only when ``log_text`` is on."""
        tokens = sum(c.outcome.completion_tokens for c in job.choices)
        log.info(
            "%s model=%s choices=%d tokens=%d status=%s %.2fs",
            job.response_id,
            job.model,
            len(job.choices),
            tokens,
            status,
            seconds,
        )
        if self.config.server.log_text:
            for c in job.choices:
                log.info(
                    "%s prompt=%r completion=%r",
                    job.response_id,
                    c.prompt.messages or c.prompt.text,
                    c.outcome.text,
                )

    def check_available(self, job: Job) -> None:
        """503 before anything is sent (a stream's 200 included) when every model the
        request names is ejected."""
        names = [m.name for m in self.fuser.select(job.choices[0].params.models)]
        out = self.fuser.members.ejected(names)
        if names and len(out) == len(names):
            raise Unavailable(unavailable(out), retry_after=self.fuser.members.retry_in(out))

    async def run_all(self, job: Job) -> None:
        async def one(choice: Choice) -> None:
            async with contextlib.aclosing(self.segments(job, choice)) as segments:
                async for _ in segments:
                    pass

        await all_or_none([one(c) for c in job.choices])

    async def chunks(self, job: Job) -> AsyncGenerator[dict[str, Any], None]:
        """Every choice's stream chunks (role, one per segment, finish) as they come: the
        choices run concurrently and their chunks interleave, each with its ``index``, as
        in vLLM. The first failure ends the stream; closing it cancels every choice."""
        queue: asyncio.Queue[dict[str, Any] | Exception | None] = asyncio.Queue()

        async def one(choice: Choice) -> None:
            try:
                lp = job.logprobs.writer() if job.logprobs else None
                # as vLLM: the prompt comes first, in a chunk of its own; with its
                # log-probs once the run has them (before its first segment)
                echo = choice.echo
                if job.kind == "chat":
                    queue.put_nowait(chunk(job, choice.index, "", role=True))
                elif echo and lp is None:
                    queue.put_nowait(chunk(job, choice.index, echo))
                    echo = ""

                def echoed() -> None:
                    nonlocal echo
                    if echo and lp is not None:
                        logprobs = lp.body((), choice.outcome.prompt_logprobs or ())
                        queue.put_nowait(chunk(job, choice.index, echo, logprobs=logprobs))
                    echo = ""

                calls = _CallWatch(job)
                async with contextlib.aclosing(self.segments(job, choice)) as segments:
                    async for seg in segments:
                        echoed()
                        text = calls.feed(seg.text)
                        logprobs = lp.body(seg.logprobs or ()) if lp else None
                        if text or job.trace or logprobs:
                            queue.put_nowait(
                                chunk(job, choice.index, text, seg=seg, logprobs=logprobs)
                            )
                echoed()
                reason = choice.outcome.finish_reason
                found, rest = calls.end()
                for i, call in enumerate(found):
                    queue.put_nowait(tool_call_chunk(job, choice.index, i, call))
                if rest:
                    queue.put_nowait(chunk(job, choice.index, rest))
                queue.put_nowait(chunk(job, choice.index, finish="tool_calls" if found else reason))
            except Exception as exc:
                queue.put_nowait(exc)
            finally:
                queue.put_nowait(None)

        tasks = [asyncio.create_task(one(c)) for c in job.choices]
        try:
            running = len(tasks)
            while running:
                item = await queue.get()
                if item is None:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            # each choice's fusion run releases its engine states on the way out
            await asyncio.gather(*tasks, return_exceptions=True)


class _CallWatch:
    """A streamed chat answer where the request gave tools: text streams as it comes,
    but an answer that opens with a call (the grammar makes "<" start calls) is held back
    and sent as tool-call deltas once complete (as text, should it not parse)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.held: list[str] = []
        self.calling: bool | None = None if job.tool_mode == "auto" else job.tool_mode != "none"

    def feed(self, text: str) -> str:
        """What of ``text`` to stream now."""
        if self.calling is None and text.strip():
            self.calling = text.lstrip().startswith("<")
            if not self.calling:
                text, self.held = "".join(self.held) + text, []
        if self.calling is False:
            return text
        self.held.append(text)
        return ""

    def end(self) -> tuple[list[ToolCall], str]:
        """The calls, or the held text when they do not parse."""
        held = "".join(self.held)
        calls = tool_calls(self.job, held) if self.calling else None
        return (calls, "") if calls else ([], held)


async def all_or_none(work: list[Coroutine[Any, Any, None]]) -> None:
    """Run ``work`` concurrently. At the first failure cancel the rest, and return (or
    raise that failure) only once every one has finished, its engine states released:
    the request's admission permit is given back after this returns."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = next((t for t in tasks if t.done() and not t.cancelled() and t.exception()), None)
        if failed is not None:
            raise failed.exception()  # type: ignore[misc]
        if any(t.cancelled() for t in tasks):  # from within, not by our caller: no answer
            raise FusionError("a choice was cancelled before it finished")
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
