"""fastclip.tokenize: ids identical to open_clip's tokenize, OpenAI's truncation contract."""
import hashlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastclip
from fastclip.tokenizer import (DEFAULT_BPE_PATH, EOT_TOKEN_ID, SOT_TOKEN_ID, ContextLengthError, SimpleTokenizer,
                                clean_text, decode, get_tokenizer, tokenize)

open_clip = pytest.importorskip("open_clip")

LONG_TEXT = " ".join(["a very long caption about a red square beside a small blue circle"] * 20)
HARD_STRINGS = [
    "",
    "   ",
    "a photo of a cat",
    "A PHOTO OF A CAT!!!   with\tTABS\nand\r\nnewlines",
    "I'M here, don't go; it's you'll we'd they've",
    # unicode scripts, combining marks, width variants
    "東京タワーの写真", "صورة قطة", "एक बिल्ली की तस्वीर", "café naïve coöperate",
    "e\u0301 vs \u00e9", "ＬＯＵＤ　ＮＯＩＳＥＳ", "ﬂubberiﬁc", "“curly” ‘quotes’ — dash…",
    "½ ² ³ ٣ 12345 3.14159",
    "\u00a0non\u00a0breaking\u2028line\u2029sep\u3000ideographic",
    # emoji: ZWJ families, skin tones, flags, keycaps
    "🐱🐶 emoji 👨‍👩‍👧‍👦 👍🏽 🇫🇷 1️⃣ ❤️‍🔥",
    # HTML entities, single and nested, with and without '<'
    "fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &#39;quoted&#39; &nbsp;x &eacute;",
    "&amp;amp;amp; triple", "<b>tag &amp; entity</b>", "&#x1F600; &unknown; & alone",
    # mojibake that ftfy repairs
    "âœ” No problems", "Ã©tÃ© Ã  Paris", "&macr;\\_(ã\x83\x84)_/&macr;", "l’hÃ´tel",
    # control characters and terminal escapes
    "\x1b[31mred\x1b[0m text", "a\x00b\x07c", "form\x0cfeed", "del\x7fete", "\ufeffbom start",
    # literal special tokens (open_clip maps them to SOT / EOT)
    "<start_of_text> inside <end_of_text>", "<|endoftext|> openai style",
    # long words, urls, code, numbers
    "supercalifragilisticexpialidocious" * 3, "https://example.com/a_b-c?d=1&e=2#frag",
    "def f(x): return x**2 // 3", "1234567890" * 5,
    LONG_TEXT,
]


def test_vocab_asset_is_the_published_file():
    digest = hashlib.sha256(DEFAULT_BPE_PATH.read_bytes()).hexdigest()
    assert digest == "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
    assert (DEFAULT_BPE_PATH.parent / "LICENSE-bpe_simple_vocab_16e6.txt").is_file()


def test_special_ids_and_vocab():
    tokenizer = get_tokenizer()
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id, tokenizer.vocab_size) == (49406, 49407, 49408)
    assert fastclip.tokenize is tokenize


@pytest.mark.parametrize("context_length", [77, 16, 5])
def test_ids_identical_to_open_clip(context_length):
    ours = tokenize(HARD_STRINGS, context_length=context_length, truncate=True)
    theirs = open_clip.tokenize(HARD_STRINGS, context_length=context_length)
    assert ours.dtype == torch.long and ours.shape == (len(HARD_STRINGS), context_length)
    mismatched = [text for text, a, b in zip(HARD_STRINGS, ours, theirs) if not torch.equal(a, b)]
    assert not mismatched, f"ids differ from open_clip for {mismatched!r}"


def test_each_string_alone_equals_batch():
    batch = tokenize(HARD_STRINGS, truncate=True)
    for row, text in enumerate(HARD_STRINGS):
        assert torch.equal(tokenize(text, truncate=True)[0], batch[row])


def test_empty_string():
    ids = tokenize("")
    assert ids[0, :2].tolist() == [SOT_TOKEN_ID, EOT_TOKEN_ID] and not ids[0, 2:].any()


def test_too_long_raises_unless_truncate():
    with pytest.raises(ContextLengthError, match="too long for context length 77"):
        tokenize(["short", LONG_TEXT])
    with pytest.raises(RuntimeError):  # OpenAI's clip.tokenize raises RuntimeError
        tokenize(LONG_TEXT)
    ids = tokenize(LONG_TEXT, truncate=True)[0]
    assert ids[0] == SOT_TOKEN_ID and ids[-1] == EOT_TOKEN_ID and (ids != 0).all()


def test_exactly_full_context_is_not_truncated():
    tokenizer = get_tokenizer()
    text = "one two three four five six seven eight"
    n = len(tokenizer.encode(text)) + 2
    ids = tokenize(text, context_length=n)[0]
    assert ids[-1] == EOT_TOKEN_ID
    with pytest.raises(ContextLengthError):
        tokenize(text, context_length=n - 1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="context_length"):
        tokenize("x", context_length=1)
    with pytest.raises(TypeError, match="strings"):
        tokenize(["ok", 3])


def test_decode_round_trip():
    ids = tokenize("a photo of a dog, 2 cats.")[0]
    assert decode(ids, skip_special=True).strip() == "a photo of a dog , 2 cats ."


def test_bpe_and_text_caches_are_used():
    tokenizer = SimpleTokenizer()
    tokenizer(["a red circle", "a red square", "a red circle"])
    assert tokenizer._text_ids.cache_info().hits == 1
    assert tokenizer._word_ids.cache_info().hits >= 2  # "a", "red"


_ascii = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=127), max_size=60)
_unicode = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(_ascii)
def test_ascii_fast_path_equals_full_clean(text):
    import ftfy
    import html

    full = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split()).strip().lower()
    assert clean_text(text) == full


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(_ascii, _unicode), min_size=1, max_size=4))
def test_random_text_matches_open_clip(texts):
    assert torch.equal(tokenize(texts, truncate=True), open_clip.tokenize(texts))
