"""A source model as the fusion loop sees it: engine, tokenizer, chat template, stops.

Each model sees the conversation through its own chat template. A base model without one
gets ``PLAIN_TEMPLATE`` ("User: ...\\n\\nAssistant:") and stops its own candidates when it
starts writing the next "\\nUser:" turn.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from fusion.engine import Engine
from fusion.tokenizer_loading import load_tokenizer
from fusion.tools import for_template
from tokenizers_align import TokenizerAdapter

PLAIN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% else %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
PLAIN_TEMPLATE_STOPS = ("\nUser:",)


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered with a model's chat template."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def load_chat_template(model_dir: Path) -> str | None:
    """The chat template shipped with an HF folder, if any."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""

    @property
    def takes_tools(self) -> bool:
        """Whether the template renders ``tools`` itself (Qwen's, Llama 3's, ...)."""
        return "tools" in self.source

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> str:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        native = self.takes_tools
        extra: dict[str, Any] = {"tools": list(tools)} if tools and native else {}
        try:
            return env.from_string(self.source).render(
                messages=for_template(messages, tools, native),
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except ChatTemplateError:
            raise
        except Exception as exc:
            raise ChatTemplateError(f"chat template failed: {exc}") from exc


@dataclass(frozen=True)
class SourceModel:
    """Everything the loop needs to know about one source model."""

    name: str
    engine: Engine
    tokenizer: TokenizerAdapter
    chat_template: ChatTemplate
    stop_strings: tuple[str, ...] = ()  # end this model's candidates (its own turn markers)
    chat_end_id: int | None = None  # token that ends an assistant turn
    max_model_len: int = 0
    step_timeout: float | None = None  # seconds one engine call may take before a drop

    @property
    def stop_ids(self) -> frozenset[int]:
        ids = set(self.tokenizer.eos_ids)
        if self.chat_end_id is not None:
            ids.add(self.chat_end_id)
        return frozenset(ids)

    def end_id(self, chat: bool) -> int | None:
        """The token this model would emit to end the answer here (scored for endings)."""
        if chat and self.chat_end_id is not None:
            return self.chat_end_id
        return self.tokenizer.eos_ids[0] if self.tokenizer.eos_ids else None

    def chat_prompt_ids(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
    ) -> list[int]:
        return self.tokenizer.encode_prompt(self.chat_template.render(messages, tools))

    def completion_prompt_ids(self, prompt: str) -> list[int]:
        return self.tokenizer.encode_prompt(prompt)


def build_source_model(
    name: str,
    engine: Engine,
    model_dir: Path,
    *,
    chat_template: str | None = None,
    stop_strings: Sequence[str] = (),
    max_model_len: int = 0,
    step_timeout: float | None = None,
    trust_remote_code: bool = False,
) -> SourceModel:
    """A ``SourceModel`` from an HF folder: its tokenizer (``tokenizer.json``, else through
    transformers, running the folder's tokenizer code only with ``trust_remote_code``),
    template and turn-end token."""
    tokenizer = load_tokenizer(model_dir, name, trust_remote_code=trust_remote_code)
    template = chat_template or load_chat_template(model_dir)
    stops = tuple(stop_strings)
    if template is None:
        template = PLAIN_TEMPLATE
        stops = stops or PLAIN_TEMPLATE_STOPS
    chat_end_id = None
    for marker in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>"):
        if marker in template:
            chat_end_id = tokenizer.tokenizer.token_to_id(marker)
            if chat_end_id is not None:
                break
    bos = tokenizer.tokenizer.id_to_token(tokenizer.bos_id) if tokenizer.bos_id is not None else ""
    eos_id = tokenizer.eos_ids[0] if tokenizer.eos_ids else None
    eos = tokenizer.tokenizer.id_to_token(eos_id) if eos_id is not None else ""
    return SourceModel(
        name=name,
        engine=engine,
        tokenizer=tokenizer,
        chat_template=ChatTemplate(template, bos_token=bos or "", eos_token=eos or ""),
        stop_strings=stops,
        chat_end_id=chat_end_id,
        max_model_len=max_model_len,
        step_timeout=step_timeout,
    )
