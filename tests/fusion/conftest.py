from __future__ import annotations

from collections.abc import Callable

import pytest

from fusion.models import ChatTemplate, SourceModel
from tests.fusion.fake_engine import ScriptedEngine
from tokenizers_align import TokenizerAdapter

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@pytest.fixture
def make_model(default_adapters: dict[str, TokenizerAdapter]) -> Callable[..., SourceModel]:
    """A source model with a real tokenizer and a scripted engine."""

    def make(
        tokenizer: str, script: str, name: str | None = None, **engine_kw: object
    ) -> SourceModel:
        adapter = default_adapters[tokenizer]
        end_id = adapter.eos_ids[0]
        engine = ScriptedEngine(name or tokenizer, adapter, script, end_id=end_id, **engine_kw)
        return SourceModel(
            name=name or tokenizer,
            engine=engine,
            tokenizer=adapter,
            chat_template=ChatTemplate(TEMPLATE),
            chat_end_id=end_id,
        )

    return make
