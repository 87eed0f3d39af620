"""Model folders without tokenizer.json: real vocabularies from pip packages, loaded through
transformers into the Rust tokenizer the adapter works on, and refused (naming the folder
and what is missing) where that would mean guessing."""

from __future__ import annotations

import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import sentencepiece
import tiktoken
from tiktoken.load import load_tiktoken_bpe

from fusion.tokenizer_loading import TokenizerLoadError, has_tokenizer_files, load_tokenizer
from tests.fixtures import extra_tokenizers

TEXTS = [
    "Hello world",
    " the end",
    "def f(x):\n    return x**2  # 12345",
    "café naïve 你好 🙂 👍🏽\ttab",
    "  two  spaces\n\n",
    "don't — it's 3.14",
]
# Llama-3's split pattern, as llama_models/llama3/tokenizer.py sets it
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")  # one digit per token


@pytest.fixture(scope="module")
def mistral() -> tuple[Path, object]:
    folder = extra_tokenizers.install("mistral-spm")
    return folder, load_tokenizer(folder, "mistral")


def test_a_sentencepiece_model_encodes_as_sentencepiece_does(mistral):
    folder, adapter = mistral
    assert not (folder / "tokenizer.json").exists()
    processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in ("Hello world", "The cat sat on the mat.\nIt was warm.", "café 你好 🙂", "x=12"):
        assert adapter.encode(text) == processor.encode(text), text
    assert (adapter.bos_id, adapter.add_bos, adapter.eos_ids) == (1, True, (2,))
    assert adapter.encode_prompt("hi")[0] == 1 and 1 not in adapter.encode("hi")


def test_a_leading_space_keeps_the_dummy_prefix_and_comes_back(mistral):
    # transformers' Metaspace(prepend_scheme="always") would encode " the" as "▁the" and
    # decode it as "the"; SentencePiece writes "▁▁the"
    _, adapter = mistral
    assert [adapter.tokenizer.id_to_token(i) for i in adapter.encode(" the")] == ["▁▁", "the"]
    for text in TEXTS:
        assert adapter.decode(adapter.encode(text)) == text, text


def test_llama3s_tiktoken_model_file_encodes_as_tiktoken_and_its_tokenizer_json(all_adapters):
    folder = extra_tokenizers.install("llama3-tiktoken")
    adapter = load_tokenizer(folder, "llama3-tiktoken")
    ranks = load_tiktoken_bpe(str(folder / "tokenizer.model"))
    encoding = tiktoken.Encoding(
        "llama3", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
    hub = all_adapters["llama3"]  # the same model's tokenizer.json (npm)
    for text in TEXTS:
        assert adapter.encode(text) == encoding.encode(text) == hub.encode(text), text
        assert adapter.word_ends(text) == hub.word_ends(text), text
    assert adapter.encode("<|eot_id|>") == [128009] and adapter.eos_ids == (128009,)
    assert 128009 in adapter.special_ids and adapter.bos_id == 128000


def test_remote_code_runs_only_with_trust_remote_code(tmp_path):
    folder = extra_tokenizers.remote_code_folder(tmp_path / "m", "TiktokenTokenizer")
    with pytest.raises(TokenizerLoadError) as err:
        load_tokenizer(folder, "glm")
    assert str(folder) in str(err.value) and "set trust_remote_code: true" in str(err.value)


def test_a_pure_python_tiktoken_tokenizer_becomes_an_equal_rust_one(tmp_path):
    folder = extra_tokenizers.remote_code_folder(tmp_path / "m", "TiktokenTokenizer")
    adapter = load_tokenizer(folder, "qwen1", trust_remote_code=True)
    ranks = load_tiktoken_bpe(str(folder / "qwen.tiktoken"))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    specials += [f"<|extra_{i}|>" for i in range(205)]
    special_ids = {t: len(ranks) + i for i, t in enumerate(specials)}
    encoding = tiktoken.Encoding(
        "qwen", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=special_ids
    )
    for text in [*TEXTS, "e\u0301te\u0301", "a<|im_end|>b"]:
        want = encoding.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert adapter.encode(text) == want, text
    assert adapter.encode("12345") == [16, 17, 18, 19, 20]  # Qwen splits digits, Llama-3 not
    assert adapter.eos_ids == (special_ids["<|endoftext|>"],) and adapter.bos_id is None
    for text in TEXTS:
        assert adapter.decode(adapter.encode(text)) == text, text


def test_a_pure_python_tokenizer_without_a_converter_is_refused(tmp_path):
    folder = extra_tokenizers.remote_code_folder(tmp_path / "m", "CharTokenizer", vocabulary=False)
    with pytest.raises(TokenizerLoadError) as err:
        load_tokenizer(folder, "chars", trust_remote_code=True)
    message = str(err.value)
    assert str(folder) in message and "CharTokenizer" in message
    assert "no Rust backend" in message and "tokenizer.json" in message


def test_a_sentencepiece_model_alone_is_refused_rather_than_misencoded(tmp_path):
    # without tokenizer_config.json transformers builds it without SentencePiece's
    # dummy prefix: "Hello" would not be "▁Hello"
    shutil.copy(extra_tokenizers.install("mistral-spm") / "tokenizer.model", tmp_path)
    with pytest.raises(TokenizerLoadError) as err:
        load_tokenizer(tmp_path, "bare")
    assert str(tmp_path) in str(err.value) and "tokenizer_config.json" in str(err.value)


def test_a_tiktoken_vocabulary_alone_is_refused(tmp_path):
    shutil.copy(extra_tokenizers.install("qwen-tiktoken") / "qwen.tiktoken", tmp_path)
    assert has_tokenizer_files(tmp_path)
    with pytest.raises(TokenizerLoadError, match=r"no tokenizer_config\.json"):
        load_tokenizer(tmp_path, "bare")


def test_a_folder_without_tokenizer_files_names_what_is_missing(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert not has_tokenizer_files(tmp_path)
    with pytest.raises(TokenizerLoadError) as err:
        load_tokenizer(tmp_path, "empty")
    assert str(err.value) == (
        f"model empty: {tmp_path} has no tokenizer (tokenizer.json, tokenizer.model, "
        "*.tiktoken, or remote code (auto_map))"
    )


def test_a_tokenizer_json_folder_loads_without_transformers(model_dirs):
    folder = model_dirs["smollm2-135m"]
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from fusion.tokenizer_loading import load_tokenizer\n"
        f"load_tokenizer(Path({str(folder)!r}), 'smol')\n"
        "assert 'transformers' not in sys.modules and 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
