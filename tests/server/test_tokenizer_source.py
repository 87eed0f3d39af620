"""A model folder whose tokenizer is not a tokenizer.json, through the server's path:
``tokenizer_source`` accepts it, ``build_source_model`` loads it (transformers), and its
chat template comes from tokenizer_config.json or chat_template.jinja as before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import cast

import pytest
import sentencepiece

from fusion.engine import Engine
from fusion.models import build_source_model
from fusion.sources import SourceError
from fusion.tokenizer_loading import TokenizerLoadError
from server.config import load_config
from server.engine_registry import tokenizer_source
from tests.fixtures import extra_tokenizers

# Mistral-7B-Instruct-v0.1's template (its tokenizer_config.json), shortened
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token + ' ' }}{% endif %}{% endfor %}"
)
NOT_USED = cast(Engine, object())  # the engine plays no part in loading a tokenizer
TEXT = "Hello world!\n\n  def f(x):\n\treturn x**2  # café 你好 🙂"


def sentencepiece_folder(root: Path, template_in: str) -> Path:
    """tokenizer.model + tokenizer_config.json, the chat template in ``template_in``."""
    spm = extra_tokenizers.install("mistral-spm")
    root.mkdir()
    shutil.copy(spm / "tokenizer.model", root)
    config = json.loads((spm / "tokenizer_config.json").read_text())
    if template_in == "tokenizer_config.json":
        config["chat_template"] = MISTRAL_TEMPLATE
    else:
        (root / "chat_template.jinja").write_text(MISTRAL_TEMPLATE)
    (root / "tokenizer_config.json").write_text(json.dumps(config))
    return root


@pytest.mark.parametrize("template_in", ["tokenizer_config.json", "chat_template.jinja"])
def test_a_sentencepiece_folder_serves_through_the_server_path(tmp_path, template_in):
    folder = sentencepiece_folder(tmp_path / "mistral", template_in)
    assert tokenizer_source(f"hf:{folder}") == folder == tokenizer_source(str(folder))
    model = build_source_model("mistral", NOT_USED, tokenizer_source(str(folder)))
    tok = model.tokenizer
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.decode(tok.encode(" " + TEXT)) == " " + TEXT
    ids = model.chat_prompt_ids([{"role": "user", "content": "What is 2+2?"}])
    # "<s>" is read as BOS (not added twice) and the rest is what SentencePiece encodes
    # after it, as Mistral's own code (mistral-common) does for this model
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert ids == [1, *processor.encode("[INST] What is 2+2? [/INST]")]
    assert tok.bos_id == 1
    assert model.stop_ids == {2}


def test_a_folder_without_tokenizer_files_is_refused_saying_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SourceError) as err:
        tokenizer_source(str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message
    assert "tokenizer.json, tokenizer.model, *.tiktoken, or remote code (auto_map)" in message
    with pytest.raises(TokenizerLoadError, match="has no tokenizer"):
        build_source_model("empty", NOT_USED, tmp_path)


def test_a_remote_code_folder_is_accepted_and_loads_only_when_trusted(tmp_path):
    folder = extra_tokenizers.remote_code_folder(tmp_path / "glm", "TiktokenTokenizer")
    assert tokenizer_source(str(folder)) == folder
    with pytest.raises(TokenizerLoadError, match="trust_remote_code: true"):
        build_source_model("glm", NOT_USED, folder)
    model = build_source_model("glm", NOT_USED, folder, trust_remote_code=True)
    assert model.tokenizer.decode(model.tokenizer.encode(TEXT)) == TEXT


def test_trust_remote_code_is_a_model_field_off_by_default():
    default, trusted = load_config(
        None,
        models=[
            {"name": "a", "source": "pip:smollm2-135m-instruct"},
            {"name": "b", "source": "pip:gemma3-270m", "trust_remote_code": True},
        ],
    ).models
    assert (default.trust_remote_code, trusted.trust_remote_code) == (False, True)
