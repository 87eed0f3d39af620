"""Word boundaries of real tokenizers on hand-picked texts."""

from __future__ import annotations

import itertools

import pytest

from tests.tokenizers_align.conftest import SLOW
from tokenizers_align import TokenizerAdapter, complete_text


def words(adapter: TokenizerAdapter, text: str) -> list[str]:
    ends = [0, *adapter.word_ends(text), len(text)]
    return [text[a:b] for a, b in itertools.pairwise(ends)]


def test_byte_level_words_follow_the_pretokenizer(default_adapters):
    qwen = default_adapters["qwen2.5-0.5b"]
    assert qwen.splits_words
    assert words(qwen, "Hello world, it's fine") == ["Hello", " world", ",", " it", "'s", " fine"]


def test_sentencepiece_words_split_at_whitespace_edges(default_adapters):
    gemma = default_adapters["gemma3-270m"]
    assert not gemma.splits_words  # its pre-tokenizer splits on " " after "▁" replaced it
    expected = ["Hello", " world,", " it's", "\n\n", "fine"]
    assert words(gemma, "Hello world, it's\n\nfine") == expected


def test_llama2_dummy_prefix_and_byte_fallback(all_adapters):
    llama2 = all_adapters["llama2"]
    text = "Hi 🙂 there\nok"
    ids = llama2.encode(text)
    assert llama2.decode(ids) == text
    # "▁" is its own token before byte-fallback bytes, so the space edge is a boundary
    assert words(llama2, text) == ["Hi", " ", "🙂", " there", "\n", "ok"]


def test_last_word_is_never_complete(aligned_adapters):
    for adapter in aligned_adapters.values():
        assert 7 not in adapter.word_ends("capital"), adapter.name
        assert adapter.word_ends("") == []


def test_incomplete_utf8_is_cut_before_analysis(default_adapters):
    smol = default_adapters["smollm2-135m"]
    ids = smol.encode("café 你好")
    partial = smol.decode(ids[:-1])
    assert partial.endswith("\ufffd")
    assert "\ufffd" not in complete_text(partial)
    assert all(p <= len(complete_text(partial)) for p in smol.word_ends(partial))


ALL = ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "llama3", "llama2", *SLOW]


@pytest.mark.parametrize("name", ALL)
def test_word_ends_are_token_boundaries_that_round_trip(aligned_adapters, name):
    adapter = aligned_adapters[name]
    text = "def f(x):\n    return x**2  # 12345 café 你好 🙂\ttab"
    for p in adapter.word_ends(text):
        assert adapter.decode(adapter.encode(text[:p])) == text[:p]


def test_gemma_adds_bos_to_prompts_only(default_adapters):
    gemma = default_adapters["gemma3-270m"]
    assert gemma.add_bos and gemma.bos_id is not None
    assert gemma.encode_prompt("hi")[0] == gemma.bos_id
    assert gemma.bos_id not in gemma.encode("hi")
    qwen = default_adapters["qwen2.5-0.5b"]
    assert qwen.encode_prompt("hi") == qwen.encode("hi")


def test_from_dir_without_tokenizer_json_names_the_folder(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"has no tokenizer\.json") as err:
        TokenizerAdapter.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_mistral_sentencepiece_words_split_at_whitespace_edges(slow_adapters):
    mistral = slow_adapters["mistral-spm"]
    assert not mistral.splits_words  # SentencePiece-style, as Llama-2 and Gemma
    # its vocabulary has no "\n\n": each newline is a token, and a word of its own
    expected = ["Hello", " world,", " it's", "\n", "\n", "fine"]
    assert words(mistral, "Hello world, it's\n\nfine") == expected
