"""CLIP's byte-level BPE tokenizer, with ids identical to open_clip's ``tokenize``.

``tokenize(texts, context_length=77, truncate=False)`` -> LongTensor (N, context_length):
``[SOT, ids..., EOT, 0, 0, ...]`` with SOT 49406, EOT 49407, pad 0, vocabulary 49,408.

Text is cleaned as open_clip/OpenAI clean it: ``ftfy.fix_text``, ``html.unescape`` twice,
whitespace runs collapsed to one space, stripped, lower-cased; then split by OpenAI's regex and
byte-pair encoded with OpenAI's merges.

The merges (``fastclip/assets/bpe_simple_vocab_16e6.txt.gz``) ship as package data: the file
OpenAI released with CLIP under the MIT licence, copied unchanged from the open_clip_torch wheel
on PyPI; its licence sits beside it.

Speed (same ids): plain ASCII text without ``&`` or control characters, which ``ftfy`` and
``html.unescape`` leave unchanged, skips them; BPE results are cached per word and whole texts
are cached (``functools.lru_cache``, bounded), so repeated captions and templates cost a lookup;
rows are filled into one NumPy buffer. ``benchmarks/bench_model.py --tokenizer`` measures it
against open_clip.

Two behaviours follow open_clip 3.x rather than OpenAI's original code, and differ from it only
on unusual input: the literal strings ``<start_of_text>`` / ``<end_of_text>`` in a caption map to
the SOT / EOT ids (OpenAI: ``<|startoftext|>`` / ``<|endoftext|>``), and whitespace is
collapsed with ``str.split()``. The output dtype is int64 (OpenAI's ``clip.tokenize`` gives
int32; the ids are the same).
"""
from __future__ import annotations

import gzip
import html
from functools import lru_cache
from pathlib import Path
from typing import Iterable, List, Sequence, Union

import numpy as np
import regex
import torch

__all__ = ["tokenize", "decode", "SimpleTokenizer", "get_tokenizer", "ContextLengthError", "SOT_TOKEN_ID",
           "EOT_TOKEN_ID", "PAD_TOKEN_ID", "VOCAB_SIZE", "DEFAULT_CONTEXT_LENGTH", "DEFAULT_BPE_PATH"]

DEFAULT_BPE_PATH = Path(__file__).resolve().parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_CONTEXT_LENGTH = 77
SOT_TOKEN_ID = 49406
EOT_TOKEN_ID = 49407
PAD_TOKEN_ID = 0
VOCAB_SIZE = 49408
_SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>")

# ASCII text that ftfy.fix_text and html.unescape return unchanged: no '&' (HTML entities) and no
# control characters other than \t \n \r (ftfy deletes them, or rewrites terminal escapes).
_NEEDS_FULL_CLEAN = regex.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f&]")


class ContextLengthError(ValueError, RuntimeError):
    """A text is longer than the context and ``truncate=False`` (a RuntimeError too, as in OpenAI's CLIP)."""


@lru_cache(maxsize=None)
def bytes_to_unicode() -> dict:
    """OpenAI's reversible map from the 256 byte values to printable unicode characters."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    byte_values, characters = printable[:], printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            byte_values.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(byte_values, map(chr, characters)))


def clean_text(text: str) -> str:
    """open_clip's 'lower' cleaning: ftfy, html.unescape twice, collapse whitespace, lower-case."""
    if text.isascii() and _NEEDS_FULL_CLEAN.search(text) is None:
        return " ".join(text.split()).lower()
    import ftfy  # noqa: PLC0415 (slow import, needed only for non-plain text)

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class SimpleTokenizer:
    """CLIP's BPE tokenizer. ``tokenizer(texts, context_length, truncate)`` -> LongTensor."""

    def __init__(self, bpe_path: Union[str, Path] = DEFAULT_BPE_PATH, *, word_cache_size: int = 1 << 18,
                 text_cache_size: int = 1 << 16):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        with gzip.open(bpe_path) as handle:
            merges = handle.read().decode("utf-8").split("\n")
        merges = [tuple(merge.split()) for merge in merges[1:49152 - 256 - 2 + 1]]
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab]
        vocab += ["".join(merge) for merge in merges]
        vocab += list(_SPECIAL_TOKENS)
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.decoder = {index: token for token, index in self.encoder.items()}
        self.bpe_ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder[_SPECIAL_TOKENS[0]]
        self.eot_token_id = self.encoder[_SPECIAL_TOKENS[1]]
        self.pattern = regex.compile("|".join(_SPECIAL_TOKENS)
                                     + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                                     regex.IGNORECASE)
        # Bounded caches, per instance: a word's ids, and a whole text's ids.
        self._word_ids = lru_cache(maxsize=word_cache_size)(self._word_ids_uncached)
        self._text_ids = lru_cache(maxsize=text_cache_size)(self._text_ids_uncached)

    def bpe(self, token: str) -> str:
        """Merge the byte-encoded characters of one word by rank; returns the pieces joined by spaces."""
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        ranks = self.bpe_ranks
        while True:
            bigram = min(pairs, key=lambda pair: ranks.get(pair, float("inf")))
            if bigram not in ranks:
                break
            first, second = bigram
            merged, i = [], 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        return " ".join(word)

    def _word_ids_uncached(self, token: str) -> tuple:
        if token in _SPECIAL_TOKENS:
            return (self.encoder[token],)
        encoded = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
        return tuple(self.encoder[piece] for piece in self.bpe(encoded).split(" "))

    def _text_ids_uncached(self, text: str) -> tuple:
        ids = []
        for token in self.pattern.findall(clean_text(text)):
            ids.extend(self._word_ids(token))
        return tuple(ids)

    def encode(self, text: str) -> List[int]:
        """BPE ids of one text, without SOT/EOT."""
        return list(self._text_ids(text))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of BPE ids (open_clip's decode: word ends become spaces)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = "".join(self.decoder[int(i)] for i in ids)
        return bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int = DEFAULT_CONTEXT_LENGTH,
                 truncate: bool = False) -> torch.LongTensor:
        """texts -> (N, context_length) int64: [SOT, ids..., EOT, 0...].

        truncate=False: a text needing more than ``context_length`` tokens raises ContextLengthError.
        truncate=True: keep the first ``context_length - 2`` ids; the last token is always EOT.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (SOT and EOT), got {context_length}")
        capacity = context_length - 2
        result = np.zeros((len(texts), context_length), dtype=np.int64)
        result[:, 0] = self.sot_token_id
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__} at position {row}")
            ids = self._text_ids(text)
            if len(ids) > capacity:
                if not truncate:
                    preview = text if len(text) <= 60 else text[:57] + "..."
                    raise ContextLengthError(
                        f"input {preview!r} is too long for context length {context_length} ({len(ids) + 2} "
                        "tokens); pass truncate=True to cut it")
                ids = ids[:capacity]
            result[row, 1:len(ids) + 1] = ids
            result[row, len(ids) + 1] = self.eot_token_id
        return torch.from_numpy(result)


def _pairs(word: tuple) -> set:
    return set(zip(word, word[1:]))


@lru_cache(maxsize=None)
def get_tokenizer() -> SimpleTokenizer:
    """The shared default tokenizer (built on first use: reading the merges takes ~0.3 s)."""
    return SimpleTokenizer()


def tokenize(texts: Union[str, Sequence[str]], context_length: int = DEFAULT_CONTEXT_LENGTH,
             truncate: bool = False) -> torch.LongTensor:
    """Token ids of ``texts``: (N, context_length) int64, identical to open_clip's ``tokenize``.

    Unlike open_clip (which always cuts), a text too long for the context raises
    ``ContextLengthError`` unless ``truncate=True``, as OpenAI's ``clip.tokenize`` does.
    """
    return get_tokenizer()(texts, context_length=context_length, truncate=truncate)


def decode(ids: Union[torch.Tensor, Iterable[int]], *, skip_special: bool = False) -> str:
    """Text of one row of ids. ``skip_special=True`` drops SOT, EOT and padding first."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if skip_special:
        ids = [i for i in ids if i not in (SOT_TOKEN_ID, EOT_TOKEN_ID, PAD_TOKEN_ID)]
    return get_tokenizer().decode(ids)
