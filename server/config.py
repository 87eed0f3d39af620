"""The server's configuration: one typed model read from YAML, env vars and CLI flags.

Precedence: CLI flags > environment (``FUSION_`` prefix, ``__`` between nested names,
e.g. ``FUSION_SERVER__PORT=9000``) > ``config.yaml``. A wrong value fails at start
with the dotted name of the field.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from fusion.answers import EXTRACTOR_NAMES, extractor
from fusion.engines.vllm_requests import LOOKAHEAD_TOKENS
from fusion.health import FaultPolicy
from fusion.types import (
    DEFAULT_POLICY,
    DEFAULT_VOTE,
    METHODS,
    RULES,
    Aggregate,
    FallbackRule,
    Method,
    NllStats,
    PplMode,
    Rule,
    SelectionPolicy,
    VoteParams,
    each_once,
    repeated,
    reranks_alone,
)

EXTRACTOR_LIST = ", ".join(EXTRACTOR_NAMES)
T = TypeVar("T")


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field."""


# source model names for one fused model (a model fused twice would hold two states)
SourceNames = Annotated[list[str], AfterValidator(each_once)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


Dtype = Literal["auto", "float32", "bfloat16", "float16"]
DTYPE_HELP = (
    "Weights dtype: auto (the model's own on a GPU; float32 on CPU, where bfloat16 is "
    "~10x slower), float32, bfloat16 or float16."
)


class TransformersOptions(_Strict):
    """Options of ``engine: transformers`` (a Hugging Face model in PyTorch)."""

    threads: int = Field(1, ge=1, description="Intra-op CPU threads for this model.")
    device: str = Field("auto", description="'auto' (GPU if present), 'cpu' or 'cuda[:N]'.")
    dtype: Dtype = Field("auto", description=DTYPE_HELP)


class _VllmScoring(_Strict):
    """What both vLLM engines (in-process and remote) share."""

    score_lookahead_tokens: int = Field(
        LOOKAHEAD_TOKENS,
        ge=0,
        le=64,
        description="Greedy tokens each scoring request generates after its candidate (and "
        "a request beside them continues the model's own candidate as far): the winner's "
        "are replayed as the next segment, so a step is one round trip per model. Each "
        "token is one more decode pass before the scores return; segments are about one "
        "word. 0: off (scoring generates only the one token vLLM requires, and the next "
        "segment is its own streaming request).",
    )


class VllmOptions(_VllmScoring):
    """Options of ``engine: vllm`` (an in-process vLLM AsyncLLM per model)."""

    dtype: Dtype = Field("auto", description=DTYPE_HELP)
    max_model_len: int | None = Field(None, ge=16, description="Context length cap.")
    gpu_memory_utilization: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Share of GPU memory for this engine; null: the vLLM engines on one GPU "
        "split 90% of it by the size of their weights (start-up fails with the sizes when "
        "they cannot fit).",
    )
    kv_cache_space_gib: int = Field(
        1, ge=1, description="KV cache size in GiB on CPU (VLLM_CPU_KVCACHE_SPACE)."
    )
    cpu_threads_bind: str | None = Field(
        None, description="CPU cores for this engine, e.g. '0' or '0-1' (vLLM on CPU)."
    )
    enforce_eager: bool | None = Field(
        None,
        description="Skip CUDA graphs and compilation; null: on CPU only (on a GPU the "
        "graphs make decoding faster).",
    )
    gpu: str | None = Field(
        None,
        pattern=r"^[0-9]+$",
        description="The GPU for this engine, e.g. '1' (by position among the visible ones; "
        "set as its CUDA_VISIBLE_DEVICES), for one engine per GPU; default: the first, "
        "shared by size with the other engines there. One GPU per engine (no tensor "
        "parallelism).",
    )
    block_size: int = Field(
        32, ge=1, description="KV block size (prefix caching; a multiple of 32 on CPU)."
    )


class LlamaCppOptions(_Strict):
    """Options of ``engine: llamacpp`` (llama.cpp on the GGUF file, batched across requests)."""

    threads: int = Field(
        1,
        ge=1,
        description="llama.cpp threads this model always has (decode and batch); see "
        "max_threads for more while the other models are idle.",
    )
    max_threads: int | None = Field(
        None,
        ge=1,
        description="Most threads while this process's other llama.cpp models are idle "
        "(at most the CPUs it may use): a model working alone (Qwen in a gated step, a "
        "request to one model) then borrows their cores, about 1.5x faster on two cores; "
        "the others' decodes wait for such a decode. Once the model's KV cache (all "
        "requests and kept prefix contexts) holds 256 cells, llama.cpp's numbers depend "
        "on how many models were at work at that moment, so a near-tie can go either way "
        "between runs. Default, or below `threads`: `threads` (never borrow).",
    )
    n_ctx: int = Field(
        16384,
        ge=256,
        description="KV cells shared by all of this model's requests (every sequence of every "
        "request: contexts, look-ahead, scoring branches). A request waits at its start until "
        "the cells it may fill are free: its prompt, max_tokens and a segment per model to "
        "score (a whole answer each for rerank).",
    )
    max_requests: int = Field(
        16, ge=1, le=64, description="Requests holding a state at once; more wait for a slot."
    )
    branches_per_request: int = Field(
        3,
        ge=1,
        le=15,
        description="Candidates a request scores side by side in one decode (more go in "
        "rounds); one sequence each.",
    )
    n_batch: int = Field(
        512, ge=32, description="Most tokens in one llama_decode (all requests together)."
    )
    prefix_cache: int = Field(
        8,
        ge=0,
        le=64,
        description="Finished contexts kept in the KV cache (least recently used first out); "
        "a prompt that starts like one of them (few-shot examples, system prompt, earlier "
        "chat turns) decodes only the rest. 0: off.",
    )
    split_below: int = Field(
        7,
        ge=0,
        le=64,
        description="A decode of 2 to this many tokens (a few scoring branches, a few "
        "requests' next tokens) runs one token per llama_decode: on CPUs llama.cpp's batched "
        "matmul costs more than that under 8 tokens (docs/BENCHMARKS.md). 0: never.",
    )


class VllmRemoteOptions(_VllmScoring):
    """Options of ``engine: vllm-remote`` (a ``vllm serve --enable-scale-out`` elsewhere)."""

    url: str = Field(
        ...,
        pattern=r"^https?://",
        description="Base URL of the model's vLLM server, e.g. http://gpu-node-1:8000 (it "
        "must serve the model of this entry's source, started with --enable-scale-out; "
        "--enable-prompt-tokens-details lets scoring read its prefix cache).",
    )
    api_key: str | None = Field(
        None, description="Bearer key of that server (its --api-key); null: none."
    )
    api_key_env: str | None = Field(
        None,
        description="Name of an environment variable holding the key, to keep it out of "
        "config files (used when api_key is null).",
    )
    connect_timeout_seconds: float = Field(
        5.0, gt=0, description="Longest wait to connect to the server."
    )
    read_timeout_seconds: float = Field(
        120.0,
        gt=0,
        description="Longest wait for the next bytes of an answer (a scoring answer, or the "
        "next token of a stream).",
    )
    start_timeout_seconds: float = Field(
        600.0,
        ge=0,
        description="How long start-up waits for the server's /health (it may still be "
        "loading its model).",
    )
    retries: int = Field(
        2,
        ge=0,
        le=10,
        description="Retries of a call that could not connect or got 502/503/504 "
        "(back-off doubling from retry_backoff_seconds).",
    )
    retry_backoff_seconds: float = Field(
        0.5,
        gt=0,
        description="First back-off between retries of one call (doubling). How long the "
        "model is left out of new requests after a failure is fusion.faults'.",
    )


class AutoOptions(_Strict):
    """Options of ``engine: auto``: one block per engine it may pick."""

    threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for whichever CPU engine is picked (llamacpp or "
        "transformers); overrides the threads of their blocks below.",
    )
    llamacpp: LlamaCppOptions = Field(
        default_factory=LlamaCppOptions,  # type: ignore[arg-type]
        description="Used when llama.cpp is picked (CPU, GGUF source).",
    )
    transformers: TransformersOptions = Field(
        default_factory=TransformersOptions,  # type: ignore[arg-type]
        description="Used when transformers is picked (no GGUF, or no llama.cpp).",
    )
    vllm: VllmOptions = Field(
        default_factory=VllmOptions,  # type: ignore[arg-type]
        description="Used when vLLM is picked (a GPU is present).",
    )


class _ModelBase(_Strict):
    """One source model: what every engine kind shares."""

    name: str = Field(..., min_length=1, description="Name used in /v1/models and requests.")
    source: str = Field(
        ...,
        min_length=1,
        description="pip:<name> (a pip-shipped model), gguf:<file>, hf:<folder> or a folder path.",
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template, or a path to a file holding one (as vLLM's "
        "--chat-template); default: the model's own, else a plain one.",
    )
    stop: list[str] = Field(
        default_factory=list, description="Strings that end this model's candidates."
    )
    step_timeout_seconds: float | None = Field(
        300.0,
        gt=0,
        description="Longest one engine call may take (a step; a whole continuation for "
        "rerank) before the model is dropped from the request; null: no limit.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Run the Python code the model folder ships (auto_map: a tokenizer such "
        "as GLM-4's or Qwen-1's, a model class) when loading its tokenizer and in vLLM, as "
        "vLLM's --trust-remote-code; only for folders you trust.",
    )


class TransformersModel(_ModelBase):
    engine: Literal["transformers"] = Field(description="Backend: transformers (PyTorch).")
    options: TransformersOptions = Field(default_factory=TransformersOptions)  # type: ignore[arg-type]


class VllmModel(_ModelBase):
    engine: Literal["vllm"] = Field(description="Backend: vLLM, in process.")
    options: VllmOptions = Field(default_factory=VllmOptions)  # type: ignore[arg-type]


class LlamaCppModel(_ModelBase):
    engine: Literal["llamacpp"] = Field(description="Backend: llama.cpp on the GGUF file.")
    options: LlamaCppOptions = Field(default_factory=LlamaCppOptions)  # type: ignore[arg-type]


class VllmRemoteModel(_ModelBase):
    engine: Literal["vllm-remote"] = Field(
        description="Backend: a remote vLLM server (token-in/token-out API); the tokenizer "
        "and chat template come from source (a tokenizer-only source is enough)."
    )
    options: VllmRemoteOptions = Field(
        ..., description="Where the server is and how to talk to it (url is required)."
    )


class AutoModel(_ModelBase):
    engine: Literal["auto"] = Field(
        "auto",
        description="vLLM where a GPU is present, else llama.cpp for GGUF sources, else "
        "transformers; the start-up log says which and why.",
    )
    options: AutoOptions = Field(default_factory=AutoOptions)  # type: ignore[arg-type]


ENGINE_KINDS = ("auto", "llamacpp", "transformers", "vllm", "vllm-remote")


def _engine_tag(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("engine", "auto"))
    return str(getattr(value, "engine", "auto"))


# One entry per engine kind (the registry in server/engine_registry.py has the factories).
ModelConfig = Annotated[
    Annotated[TransformersModel, Tag("transformers")]
    | Annotated[VllmModel, Tag("vllm")]
    | Annotated[LlamaCppModel, Tag("llamacpp")]
    | Annotated[VllmRemoteModel, Tag("vllm-remote")]
    | Annotated[AutoModel, Tag("auto")],
    Discriminator(
        _engine_tag,
        custom_error_type="engine",
        custom_error_message=f"engine must be one of: {', '.join(ENGINE_KINDS)}",
    ),
]


class NllStatsConfig(_Strict):
    """One model's calibration statistics (``fusion-server calibrate`` writes them)."""

    nll_mean: float = Field(..., description="Mean per-token NLL of segments under this model.")
    nll_std: float = Field(..., gt=0, description="Standard deviation of that NLL.")


class SelectionConfig(_Strict):
    """How a fusion step chooses among candidates (docs/SELECTION.md).

    The one declaration of the selection settings: the config file's, and, all optional,
    the request's ``fusion.selection`` (``server.protocol.SelectionOptions``, made from
    this). Defaults come from the core's ``SelectionPolicy``, which has the same fields
    (a test holds them equal)."""

    rule: Rule = Field(
        DEFAULT_POLICY.rule,
        description=f"Selection rule, one of {', '.join(RULES)}. mean_ppl is the paper's "
        "(arithmetic mean of the models' perplexities, equal votes).",
    )
    aggregate: Aggregate = Field(
        DEFAULT_POLICY.aggregate,
        description="For rule weighted (and the gate's weighted fallback): 'nll' (weighted "
        "mean of NLLs: a weighted geometric mean of perplexities, which one exploding "
        "perplexity cannot rule) or 'ppl' (weighted arithmetic mean of perplexities).",
    )
    weights: dict[str, float] = Field(
        default_factory=dict,
        description="Static weight per source model (weighted, zscore, the gate's fallback); "
        "models not listed weigh 1.",
    )
    leader: str | None = Field(
        DEFAULT_POLICY.leader,
        description="The strong model: the sole judge under 'leader', the writer under 'gate'.",
    )
    calibration: dict[str, NllStatsConfig] = Field(
        default_factory=dict,
        description="Per source model NLL mean/std for rule zscore (from fusion-server calibrate).",
    )
    packllm_temperature: float = Field(
        DEFAULT_POLICY.packllm_temperature,
        gt=0,
        description="PackLLM's τ: weights = softmax(-prompt NLL / τ) over models.",
    )
    gate_threshold: float = Field(
        DEFAULT_POLICY.gate_threshold,
        gt=0,
        le=1,
        description="Gate: the leader's segment is kept alone when every one of its tokens "
        "has at least this probability (GaC uses 0.5).",
    )
    gate_fallback: FallbackRule = Field(
        DEFAULT_POLICY.gate_fallback,
        description="Gate: the rule that chooses when the leader is unsure (every model "
        "proposes and scores).",
    )
    repetition_ngram: int = Field(
        DEFAULT_POLICY.repetition_ngram,
        ge=1,
        le=32,
        description="Repetition guard: word n-gram length.",
    )
    repetition_limit: int = Field(
        DEFAULT_POLICY.repetition_limit,
        ge=0,
        description="Repetition guard: exclude a candidate that closes an n-gram already seen "
        "this many times in the answer (unless every candidate does); 0: off.",
    )
    leader_margin: float | None = Field(
        DEFAULT_POLICY.leader_margin,
        ge=0,
        description="Leader's veto (needs leader): exclude a candidate whose per-token NLL "
        "under the leader exceeds that of the leader's own candidate by more than this many "
        "nats; the others vote among the rest. null: off.",
    )
    leader_excess: float | None = Field(
        DEFAULT_POLICY.leader_excess,
        ge=0,
        description="Leader's veto on the whole candidate (needs leader): exclude it when its "
        "tokens together cost the leader more than this many nats beyond the leader's own "
        "per-token rate (one wrong word in a long segment counts fully). null: off.",
    )
    min_support: int = Field(
        DEFAULT_POLICY.min_support,
        ge=1,
        description="Consensus: a candidate fewer than this many models proposed (the same "
        "text) cannot win, unless the leader proposed it (unless no candidate qualifies). "
        "1: off.",
    )

    def problems(self, models: list[str] | None = None) -> list[str]:
        """What is inconsistent, each message naming its field (``models``: the known
        source model names, to check the names used). ``AppConfig`` and the request
        checks run this; a standalone ``SelectionConfig`` is not checked."""
        out = []
        step_rule = self.gate_fallback if self.rule == "gate" else self.rule
        if self.rule in ("leader", "gate") and self.leader is None:
            out.append(f"selection.leader: rule {self.rule!r} needs a leader model")
        if step_rule == "leader" and self.leader is None:
            out.append("selection.leader: gate_fallback 'leader' needs a leader model")
        if self.leader is None and (self.leader_margin, self.leader_excess) != (None, None):
            out.append("selection.leader: leader_margin and leader_excess need a leader model")
        if step_rule == "zscore" and not self.calibration:
            out.append("selection.calibration: rule zscore needs per-model NLL statistics")
        if any(w < 0 for w in self.weights.values()):
            out.append("selection.weights: weights must not be negative")
        if models is not None:
            for name, used in (
                ("weights", list(self.weights)),
                ("leader", [self.leader] if self.leader else []),
                ("calibration", list(self.calibration)),
            ):
                unknown = [n for n in used if n not in models]
                if unknown:
                    out.append(f"selection.{name}: unknown source models: {', '.join(unknown)}")
        return out

    def policy(self) -> SelectionPolicy:
        """The core's frozen view of these settings (maps become tuples of pairs)."""
        values = dict(self)
        values["weights"] = tuple(self.weights.items())
        values["calibration"] = tuple(
            (n, NllStats(s.nll_mean, s.nll_std)) for n, s in self.calibration.items()
        )
        return SelectionPolicy(**values)


def _known_extractor(spec: str | None) -> str | None:
    if spec is not None:
        extractor(spec)  # ValueError naming the extractors that exist
    return spec


AnswerSpec = Annotated[
    str | None,
    AfterValidator(_known_extractor),
    Field(
        description="Method vote: how an answer is read as the key it votes for: "
        "last_number, boxed, choice, exact, regex:<pattern> or json:<field path> "
        "(docs/SELECTION.md, Voting)."
    ),
]


class VoteConfig(_Strict):
    """Method ``vote``'s sampling and stopping (fusion/vote.py; docs/SELECTION.md,
    "Voting"). The one declaration: the config file's, and, all optional, the request's
    ``fusion.vote``."""

    k: int = Field(
        DEFAULT_VOTE.k, ge=1, le=16, description="Samples a member draws at once (batched)."
    )
    threshold: float = Field(
        DEFAULT_VOTE.threshold,
        gt=0,
        le=1,
        description="Sampling stops once one member's samples agree this much (the share "
        "holding its most frequent answer); otherwise the next member samples.",
    )
    budget: int = Field(
        DEFAULT_VOTE.budget, ge=1, le=64, description="Samples in all, every member's together."
    )
    temperature: float = Field(
        DEFAULT_VOTE.temperature,
        gt=0,
        le=2,
        description="The samples' temperature when the request's is 0 or not given.",
    )
    seed: int | None = Field(
        DEFAULT_VOTE.seed,
        description="The samples' seed when the request gives none (null: random).",
    )

    def params(self, answer: str | None) -> VoteParams:
        return VoteParams(answer=answer, **self.model_dump())


class VariantConfig(_Strict):
    """A named variant of the fused model: its defaults with these fields on top, served
    under its own model name (so any client, chat UI or lm-eval run can pick it)."""

    description: str | None = Field(None, description="Shown in /v1/models.")
    method: Method | None = Field(None, description="Method; null: the fused model's.")
    models: SourceNames | None = Field(
        None, min_length=1, description="Source models to fuse; null: the fused model's."
    )
    max_segment_tokens: int | None = Field(None, ge=1, le=256)
    ppl_mode: PplMode | None = None
    selection: dict[str, Any] = Field(
        default_factory=dict,
        description="Selection fields replacing the fused model's (as a request's "
        "fusion.selection); checked at start.",
    )
    answer: AnswerSpec = None
    vote: dict[str, Any] = Field(
        default_factory=dict,
        description="Vote fields replacing the fused model's (as a request's fusion.vote).",
    )


class FaultsConfig(_Strict):
    """When a source model is dropped from a request, ejected, and probed back
    (fusion/health.py; docs/DEPLOYMENT.md, "When a source model fails")."""

    deadline_factor: float = Field(
        5.0,
        gt=1,
        description="A call is late past this many times what the model's own recent calls "
        "of its kind took (per token of work, times the calls it had queued, times how much "
        "slower than usual its peers were in the same step); a late model is dropped from "
        "the request and ejected.",
    )
    deadline_floor_seconds: float = Field(
        5.0, gt=0, description="No call is late before this many seconds."
    )
    warmup_calls: int = Field(
        3,
        ge=1,
        description="Calls of a kind a model makes before its deadline applies (until then "
        "only its step_timeout_seconds does).",
    )
    eject_seconds: float = Field(
        1.0, gt=0, description="First ejection: how long before the model is probed."
    )
    max_eject_seconds: float = Field(
        15.0,
        gt=0,
        description="Longest ejection: the ejection doubles each time a model fails again "
        "within forgive_seconds of its return (a flapping model), up to this.",
    )
    forgive_seconds: float = Field(
        60.0, ge=0, description="Up this long without a fault, the next ejection is short again."
    )
    probe_timeout_seconds: float = Field(
        10.0,
        gt=0,
        description="The probe that brings an ejected model back: its health check and a "
        "one-token generation, within this many seconds.",
    )

    def policy(self) -> FaultPolicy:
        return FaultPolicy(**self.model_dump())


class FusionConfig(_Strict):
    """Defaults of the fused model."""

    name: str = Field("fusion", min_length=1, description="Model name of the fused model.")
    method: Method = Field("cool", description=f"Default method: one of {', '.join(METHODS)}.")
    max_segment_tokens: int = Field(
        16, ge=1, le=256, description="Token cap per model per segment before a forced cut."
    )
    ppl_mode: PplMode = Field("mean", description="Perplexity: 'mean' token NLL or 'sum'.")
    window_pieces: int = Field(
        4, ge=1, description="Committed segments kept for incremental tokenisation."
    )
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request omits it.")
    models: SourceNames | None = Field(
        None,
        min_length=1,
        description="Source models the fused model uses unless a request names its own "
        "(fusion.models); null: all of models:.",
    )
    selection: SelectionConfig = Field(
        default_factory=SelectionConfig,  # type: ignore[arg-type]
        description="How each step chooses its segment (rule, weights, leader, gate, guard).",
    )
    variants: dict[str, VariantConfig] = Field(
        default_factory=dict,
        description="More fused model names, each the fused model with some settings "
        "replaced, e.g. the paper's exact method beside a tuned default.",
    )
    answer: AnswerSpec = None
    vote: VoteConfig = Field(
        default_factory=VoteConfig,  # type: ignore[arg-type]
        description="Method vote: samples per draw, stopping, budget, temperature.",
    )
    faults: FaultsConfig = Field(
        default_factory=FaultsConfig,  # type: ignore[arg-type]
        description="Deadlines of the source models' calls, their ejection and return.",
    )

    def variant_vote(self, name: str) -> tuple[str | None, VoteConfig]:
        """The answer extractor and vote settings of the fused model or a variant."""
        variant = self.variants.get(name)
        if variant is None:
            return self.answer, self.vote
        answer = variant.answer or self.answer
        if not variant.vote:
            return answer, self.vote
        return answer, VoteConfig.model_validate(self.vote.model_dump() | variant.vote)

    def variant_models(self, name: str) -> list[str] | None:
        """The source models the fused model or a variant uses; None: all of models:."""
        variant = self.variants.get(name)
        return list((variant and variant.models) or self.models or []) or None

    def variant_method(self, name: str) -> Method:
        variant = self.variants.get(name)
        return (variant and variant.method) or self.method

    def variant_selection(self, name: str) -> SelectionConfig:
        """The selection settings of the fused model or of one of its variants."""
        if name == self.name or not self.variants[name].selection:
            return self.selection
        merged = self.selection.model_dump() | self.variants[name].selection
        return SelectionConfig.model_validate(merged)


class ServerConfig(_Strict):
    """HTTP server settings."""

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=0, le=65535, description="Bind port.")
    api_keys: list[str] = Field(default_factory=list, description="Accepted Bearer keys.")
    api_key_file: Path | None = Field(None, description="File with one API key per line.")
    cors_origins: list[str] = Field(
        default_factory=list, description="CORS origins (off if empty)."
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest request body.")
    max_tokens_cap: int = Field(4096, ge=1, description="Largest max_tokens a request may ask.")
    max_concurrent: int = Field(
        4,
        ge=1,
        description="Choices (fusion runs) generating at once; a request takes one per "
        "choice (all of them if it has more, then it runs alone).",
    )
    max_concurrent_single: int = Field(
        2,
        ge=1,
        description="Choices generating at once for requests to one source model by name "
        "(e.g. a chat UI's title and tag tasks): a lane and queue of their own, so they "
        "never wait behind fused requests.",
    )
    max_queue: int = Field(
        16, ge=0, description="Requests waiting in each lane beyond those; more get 429."
    )
    max_choices: int = Field(
        8,
        ge=1,
        description="Most choices one request may ask for (prompts × n); more get 400.",
    )
    keepalive_seconds: float = Field(
        5.0,
        gt=0,
        description="Interval of the SSE keep-alive comments a stream sends, also while it "
        "waits for a slow or hung source model (so proxies keep the connection).",
    )
    shutdown_grace_seconds: float = Field(30.0, ge=0, description="In-flight time on SIGTERM.")
    log_text: bool = Field(False, description="Log prompt and completion text (off by default).")


class AppConfig(BaseSettings):
    """The whole configuration (``config.yaml``)."""

    model_config = SettingsConfigDict(
        env_prefix="FUSION_", env_nested_delimiter="__", extra="forbid", yaml_file=None
    )

    server: ServerConfig = Field(default_factory=ServerConfig)  # type: ignore[arg-type]
    models: list[ModelConfig] = Field(..., min_length=1, description="The source models.")
    fusion: FusionConfig = Field(default_factory=FusionConfig)  # type: ignore[arg-type]

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        dup = repeated([m.name for m in models])
        if dup:
            raise ValueError(f"model names must be unique: {', '.join(dup)}")
        return models

    @model_validator(mode="after")
    def _fusion_name_free(self) -> AppConfig:
        if self.fusion.name in {m.name for m in self.models}:
            raise ValueError(f"fusion.name {self.fusion.name!r} is also a source model's name")
        return self

    @model_validator(mode="after")
    def _fusion_names_known(self) -> AppConfig:
        names = [m.name for m in self.models]
        unknown = [n for n in self.fusion.models or [] if n not in names]
        if unknown:
            raise ValueError(f"fusion.models: unknown source models: {', '.join(unknown)}")
        for problem in self.fusion.selection.problems(names):
            raise ValueError(f"fusion.{problem}")
        for name, variant in self.fusion.variants.items():
            where = f"fusion.variants.{name}"
            if name in names or name == self.fusion.name:
                raise ValueError(f"{where}: the name is already a model's")
            unknown = [n for n in variant.models or [] if n not in names]
            if unknown:
                raise ValueError(f"{where}.models: unknown source models: {', '.join(unknown)}")
            chosen = _merged(f"{where}.selection", self.fusion.variant_selection, name)
            for problem in chosen.problems(names):
                raise ValueError(f"{where}.{problem}")
            _merged(f"{where}.vote", self.fusion.variant_vote, name)
        for name in (self.fusion.name, *self.fusion.variants):
            where = "fusion" if name == self.fusion.name else f"fusion.variants.{name}"
            method = self.fusion.variant_method(name)
            members = self.fusion.variant_models(name) or names
            if reranks_alone(method, members):
                raise ValueError(
                    f"{where}: method {method} reranks the answers of two or more source "
                    f"models; it has one ({members[0]}): use cool"
                )
            if method == "vote" and not self.fusion.variant_vote(name)[0]:
                raise ValueError(
                    f"{where}.answer: method vote needs an answer extractor ({EXTRACTOR_LIST})"
                )
        return self

    def all_api_keys(self) -> list[str]:
        keys = list(self.server.api_keys)
        if self.server.api_key_file is not None:
            keys += [k.strip() for k in self.server.api_key_file.read_text().splitlines()]
        env = os.environ.get("FUSION_API_KEY")
        if env:
            keys.append(env)
        return [k for k in keys if k]


def _merged(where: str, merge: Callable[[str], T], name: str) -> T:
    """Variant ``name``'s settings merged over the fused model's; invalid ones name the
    field."""
    try:
        return merge(name)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"{where}.{field}: {err['msg']}") from None


def _format(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        # a model's errors carry its engine kind in the path: "models.0.options.threads
        # (engine llamacpp)" reads better than "models.0.llamacpp.options.threads"
        kind = ""
        if len(loc) > 2 and loc[0] == "models" and loc[2] in ENGINE_KINDS:
            kind = f" (engine {loc.pop(2)})"
        if e["type"] == "engine":
            loc.append("engine")
        where = ".".join(loc) or "(root)"
        lines.append(f"  {where}: {e['msg']}{kind}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, **overrides: Any) -> AppConfig:
    """Load ``path`` (YAML), then env vars, then ``overrides`` (e.g. from CLI flags).

    ``overrides`` use nested dicts: ``server={"port": 9000}``.
    """
    source = str(path) if path else "defaults"
    if path is not None and not Path(path).is_file():
        raise ConfigError(f"config file {path} does not exist")

    class _FromFile(AppConfig):
        model_config = SettingsConfigDict(**{**AppConfig.model_config, "yaml_file": path})

    try:
        loaded = _FromFile(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format(exc, source)) from None
    return AppConfig.model_construct(**{k: getattr(loaded, k) for k in AppConfig.model_fields})
