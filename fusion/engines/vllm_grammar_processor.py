"""A vLLM logits processor that keeps a fusion member's sampling inside its request's
grammar (structured outputs on the vLLM engines).

vLLM loads it at engine construction: the in-process engine puts it in its engine config
(``vllm_engine.py``); a remote member's server is started with ``--logits-processors
fusion.engines.vllm_grammar_processor:GrammarLogitsProcessor`` (docs/DEPLOYMENT.md) and
the remote engine checks at start that it is loaded (``vllm_grammar.processor_answers``).
It implements vLLM's V1 interface (``vllm/v1/sample/logits_processor/interface.py``),
which the V1 model runner takes: vLLM on CPU, and on a GPU with
``VLLM_USE_V2_MODEL_RUNNER=0`` (the V2 runner has an interface of its own).

A request opts in with ``SamplingParams.extra_args["fusion_grammar"]``
(``vllm_grammar.py``): the compiled grammar, the end ids the member's vocabulary was built
with, and the answer's tokens in the request's prompt. For it the processor holds a
``MemberGrammar`` (fusion/grammar.py, the one the fusion loop uses) advanced over those
tokens, then over each token vLLM samples (the request's output list, which vLLM keeps
up to date in place), and sets every token the grammar does not allow next to -inf. The
log-probs vLLM reports are computed before any processor (raw), as the other engines
report theirs. Requests without the argument cost nothing.

The llguidance vocabulary is built as the loop builds it (``Vocabularies``, from the
served model's tokenizer, loaded by ``fusion.tokenizer_loading``) once per process and
set of end ids; compiled grammars are kept and copied per request.

An exception here would end vLLM's engine core: a request whose grammar cannot be built
or whose tokens it refuses is left unconstrained (and logged); the fusion engine's own
``take`` then stops its generation where the grammar refuses.

Imports: vLLM, torch, numpy, llguidance, tokenizers and light modules of this package,
none of the fusion server's own dependencies.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from fusion.engines.vllm_grammar import GrammarArgs, request_grammar
from fusion.grammar import MemberGrammar, Vocabularies

if TYPE_CHECKING:
    from vllm.config import VllmConfig

log = logging.getLogger(__name__)

KEPT_GRAMMARS = 32  # compiled grammars kept for the next requests (each a few kB)


@dataclass
class _Row:
    """One request's grammar and how far it has followed the request's output."""

    grammar: MemberGrammar
    output: list[int]  # vLLM's list of the request's sampled tokens (updated in place)
    seen: int = 0

    def allowed(self, width: int) -> Any:
        """The tokens allowed next (a bool array), or None: leave the row as it is."""
        while self.seen < len(self.output) and not self.grammar.lost:
            tok = self.output[self.seen]
            if tok < 0:  # a placeholder of async scheduling, filled before the next step
                break
            if not self.grammar.take(tok):
                log.warning("grammar processor: a sampled token left the grammar; unconstrained")
                self.grammar.lost = True
            self.seen += 1
        if self.grammar.lost:
            return None
        allowed = self.grammar.allowed(width)
        return allowed if allowed.any() else None


class GrammarLogitsProcessor(LogitsProcessor):
    """Masks the logits of requests that carry ``extra_args["fusion_grammar"]``."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        model = vllm_config.model_config
        self.source = str(model.tokenizer)
        self.revision = model.tokenizer_revision
        self.trust_remote_code = bool(model.trust_remote_code)
        self.vocabularies = Vocabularies()
        self.tokenizer: Any = None  # the served model's tokenizers.Tokenizer, on first use
        self.compiled: OrderedDict[tuple[tuple[int, ...], str], MemberGrammar] = OrderedDict()
        self.rows: dict[int, _Row] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        request_grammar(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes greedy picks

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        width = logits.shape[-1]
        for index, row in self.rows.items():
            allowed = row.allowed(width)
            if allowed is not None:
                keep = torch.from_numpy(allowed).to(logits.device, non_blocking=True)
                logits[index].masked_fill_(~keep, float("-inf"))
        return logits

    def _row(self, params: SamplingParams, prompt: list[int] | None, output: list[int]) -> Any:
        try:
            args = request_grammar(params.extra_args)
            if args is None:
                return None
            grammar = self._grammar(args)
        except Exception:
            log.exception("grammar processor: the request's grammar failed; unconstrained")
            return None
        grammar.commit(list(args.before))
        if grammar.lost:
            log.warning("grammar processor: the answer so far is not in the grammar; unconstrained")
            return None
        return _Row(grammar, output)

    def _grammar(self, args: GrammarArgs) -> MemberGrammar:
        """A fresh grammar state at the answer's start (a copy of the compiled one)."""
        key = (args.eos, args.grammar)
        compiled = self.compiled.get(key)
        if compiled is None:
            name = f"eos={list(args.eos)}"
            vocab = self.vocabularies.get(name, self._tokenizer_json, frozenset(args.eos))
            compiled = self.compiled[key] = MemberGrammar(vocab, args.grammar)
            while len(self.compiled) > KEPT_GRAMMARS:
                self.compiled.popitem(last=False)
        self.compiled.move_to_end(key)
        return compiled.fork()

    def _tokenizer_json(self) -> str:
        if self.tokenizer is None:
            from fusion.tokenizer_loading import load_tokenizer

            folder = _folder(self.source, self.revision)
            adapter = load_tokenizer(folder, folder.name, trust_remote_code=self.trust_remote_code)
            self.tokenizer = adapter.tokenizer
        return str(self.tokenizer.to_str())


def _folder(source: str, revision: str | None) -> Path:
    """The served tokenizer's folder (a Hub name: its snapshot in the local cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(source, revision=revision, local_files_only=True))
