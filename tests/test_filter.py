"""The interpretable filter (>= 7 of a unit's top 10 tokens are dictionary words of >= 3 letters)
and the shipped SCOWL en-US + en-GB word list."""

import mmn  # noqa: F401,I001  (torchvision shim before transformers)

import gzip
import re

import pytest

from mmn.analysis.filter import (SCOWL_PATH, InterpretableFilter, check_filter, is_interpretable, is_word,
                                 load_dictionary)

AIRCRAFT = [" aircraft", " flight", " airplanes", " plane", " jets", " pilots", " planes", " flights", " airline",
            " aviation"]
NOISE = ["lihood", "/**", " Dwar", "ockets", "\ufffd\ufffd", " Nitrome", "umbnails", " \u88cf", "romancer", " ?]"]
WORDS = [" horse", " horses", " stable", " saddle", " riding", " pony", " ponies", " gallop", " mare", " foal"]


def mix(n_words):
    """Ten tokens: n_words dictionary words, then noise."""
    return WORDS[:n_words] + NOISE[: 10 - n_words]


def test_shipped_list():
    words = load_dictionary()
    assert SCOWL_PATH.name == "scowl-en-50.txt.gz" and SCOWL_PATH.is_file()
    assert len(words) == 74_986  # words/README.md; US + GB, lowercased, a-z only
    assert {"aircraft", "colour", "color", "horses", "zebra"} <= words
    assert "lihood" not in words
    assert all(word.isascii() and word.isalpha() and word.islower() for word in words)
    assert load_dictionary() is words  # cached
    with gzip.open(SCOWL_PATH, "rt") as lines:
        listed = lines.read().splitlines()
    assert listed == sorted(set(listed))


def test_paper_examples():
    words = load_dictionary()
    assert is_interpretable(AIRCRAFT, words)
    assert not is_interpretable(NOISE, words)
    assert InterpretableFilter()(AIRCRAFT) and not InterpretableFilter()(NOISE)


def test_threshold_is_inclusive():
    assert [is_word(t, load_dictionary(), 3) for t in WORDS] == [True] * 10
    assert InterpretableFilter()(mix(7))
    assert not InterpretableFilter()(mix(6))
    assert InterpretableFilter(min_words=6)(mix(6))
    assert InterpretableFilter(min_words=0)(NOISE)


def test_min_letters():
    words = load_dictionary()
    assert "it" in words and "an" in words
    assert not is_word(" it", words, 3)
    assert is_word(" it", words, 2)
    assert is_word(" cat", words, 3) and not is_word(" cat", words, 4)
    two_letter = ["it", "an", "on", "in", "at"] + WORDS[:5]  # 5 real words of >= 3 letters
    assert not InterpretableFilter()(two_letter)
    assert InterpretableFilter(min_letters=2)(two_letter)


def test_case_whitespace_and_characters():
    words = load_dictionary()
    for token in ["aircraft", " aircraft", "Aircraft", " AIRCRAFT", "\taircraft\n", "aircraft "]:
        assert is_word(token, words, 3), token
    for token in [" air craft", " aircraft's", " aircraft2", "aircr\u00e1ft", "", "   ", "\u0120aircraft"]:
        assert not is_word(token, words, 3), token


def test_uses_only_top_k():
    assert not InterpretableFilter()(mix(6) + WORDS)  # words after the top 10 do not count
    assert InterpretableFilter(top_k=3, min_words=3)(WORDS[:3] + NOISE)
    with pytest.raises(ValueError, match="filter.top_k=10 tokens, got 9"):
        InterpretableFilter()(AIRCRAFT[:9])


@pytest.mark.parametrize("suffix", [".txt", ".txt.gz"])
def test_custom_dictionary(tmp_path, suffix):
    path = tmp_path / f"words{suffix}"
    text = "Zorp\n\n  blick \nfoo\n"
    if suffix.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    assert load_dictionary(path) == load_dictionary(str(path)) == frozenset({"zorp", "blick", "foo"})
    keep = InterpretableFilter(top_k=3, min_words=2, dictionary=str(path))
    assert keep.words == {"zorp", "blick", "foo"}
    assert keep([" zorp", " Blick", " aircraft"])
    assert not keep([" zorp", " aircraft", " horse"])  # SCOWL words mean nothing here


def test_bad_word_lists(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        load_dictionary(missing)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        InterpretableFilter(dictionary=str(missing))  # at construction, before any work
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt"):
        load_dictionary(empty)


@pytest.mark.parametrize(("top_k", "min_words", "min_letters", "message"), [
    (0, 0, 3, "filter.top_k=0 must be >= 1"),
    (10, 12, 3, "filter.min_words=12 must be in 0..filter.top_k=10"),
    (10, -1, 3, "filter.min_words=-1 must be in 0..filter.top_k=10"),
    (10, 7, 0, "filter.min_letters=0 must be >= 1"),
])
def test_bad_thresholds(top_k, min_words, min_letters, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_filter(top_k, min_words, min_letters)
    with pytest.raises(ValueError, match=re.escape(message)):
        InterpretableFilter(top_k, min_words, min_letters)
    check_filter(10, 7, 3)
    check_filter(1, 0, 1)
    check_filter(10, 10, 1)
