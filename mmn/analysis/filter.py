"""The paper's interpretable filter: which units decode to English words.

A unit (MLP neuron) is *interpretable* when at least `min_words` (7) of its `top_k` (10) decoded
tokens (decoding.py) are English dictionary words of at least `min_letters` (3) letters. A token
counts as a word when, with its surrounding whitespace stripped (GPT tokens carry a leading space,
" aircraft"), it is made of ASCII letters only and its lowercase form is in the dictionary.

The dictionary is the paper's SCOWL en-US + en-GB list: Debian's `wamerican` and `wbritish`
(SCOWL size 50), lowercased, a-z entries only, 74,986 words, shipped as words/scowl-en-50.txt.gz
(words/README.md says how it was built; words/SCOWL-COPYRIGHT.txt is its licence). Any other list,
plain text or .gz with one word per line, can take its place.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

SCOWL_PATH = Path(__file__).parent / "words" / "scowl-en-50.txt.gz"


def load_dictionary(path: str | Path | None = None) -> frozenset[str]:
    """The lowercased words of a word list (one per line, plain or .gz); None: the shipped SCOWL list."""
    if path is None:
        return _scowl()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word list not found: {path}")
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8") as lines:
        words = frozenset(word for line in lines if (word := line.strip().lower()))
    if not words:
        raise ValueError(f"word list {path} holds no words")
    return words


@cache
def _scowl() -> frozenset[str]:
    return load_dictionary(SCOWL_PATH)


def is_word(token: str, dictionary: frozenset[str], min_letters: int) -> bool:
    """Whether `token`, stripped of surrounding whitespace, is a dictionary word of >= min_letters ASCII letters."""
    word = token.strip()
    return len(word) >= min_letters and word.isascii() and word.isalpha() and word.lower() in dictionary


def is_interpretable(tokens: Sequence[str], dictionary: frozenset[str], min_words: int = 7,
                     min_letters: int = 3) -> bool:
    """Whether at least `min_words` of `tokens` are dictionary words (is_word)."""
    return sum(is_word(token, dictionary, min_letters) for token in tokens) >= min_words


def check_filter(top_k: int, min_words: int, min_letters: int) -> None:
    """Raise ValueError, naming the config key, unless 1 <= top_k, 0 <= min_words <= top_k and 1 <= min_letters."""
    if top_k < 1:
        raise ValueError(f"filter.top_k={top_k} must be >= 1")
    if not 0 <= min_words <= top_k:
        raise ValueError(f"filter.min_words={min_words} must be in 0..filter.top_k={top_k}")
    if min_letters < 1:
        raise ValueError(f"filter.min_letters={min_letters} must be >= 1")


@dataclass(frozen=True)
class InterpretableFilter:
    """The paper's rule on a unit's decoded tokens (best first); `dictionary`: a word list path, None for SCOWL."""

    top_k: int = 10
    min_words: int = 7
    min_letters: int = 3
    dictionary: str | None = None

    def __post_init__(self) -> None:
        check_filter(self.top_k, self.min_words, self.min_letters)
        self.words  # load now, so that a bad word list fails before any long work

    @cached_property
    def words(self) -> frozenset[str]:
        return load_dictionary(self.dictionary)

    def __call__(self, tokens: Sequence[str]) -> bool:
        if len(tokens) < self.top_k:
            raise ValueError(f"InterpretableFilter needs filter.top_k={self.top_k} tokens, got {len(tokens)}")
        return is_interpretable(tokens[: self.top_k], self.words, self.min_words, self.min_letters)
