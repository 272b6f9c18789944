"""The target token c: the first noun of a generated caption, and its first token.

The paper attributes the logit of c, "the first noun of the caption"; if that
noun spans several tokens, c is its first token (our reading: the paper attributes
one token's logit, and the first is the one the captioner commits to). The paper
names no tagger, so the finder is pluggable: any callable `caption -> Noun | None`.

The default, `LexiconFirstNoun`, works offline. It reads open-class parts of
speech from lemminflect's lexicon (shipped inside that package: AGID and the
SPECIALIST lexicon, about 120k words) and closed-class words from the short list
below, and applies one rule: the first word that can be a noun is the first noun,
unless it can also be an adjective and the next word can be a noun ("red" in
"a red circle", "living" in "a living room"). Words the lexicon does not know
are taken as nouns, since unknown words in captions are mostly names of things.
`SpacyFirstNoun` uses a spaCy pipeline instead when one is installed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Determiners, pronouns, prepositions, conjunctions, auxiliaries, numerals and
# other function words: never the first noun.
CLOSED_CLASS = frozenset(
    """
    a an the this that these those some any each every no another other such what which whose
    my your his her its our their one two three four five six seven eight nine ten several many
    few both all most more less much lots lot
    i you he she it we they me him us them myself itself themselves who whom whoever something
    someone anything nothing everything there here
    of in on at by for with without to from into onto upon over under above below between among
    through across along around behind beside besides near next against toward towards up down out
    off inside outside within during before after while about like as than via per
    and or but nor so yet if then because although though while
    is are was were be been being am has have had having do does did can could will would shall
    should may might must not very too also just only even still really
    """.split()
)

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


@dataclass(frozen=True)
class Noun:
    word: str
    start: int  # character offsets of the word in the caption
    end: int


FirstNounFinder = Callable[[str], "Noun | None"]


class LexiconFirstNoun:
    """First noun from a lexicon of parts of speech; see the module docstring."""

    def __init__(self) -> None:
        import lemminflect  # imported here so mmn imports without it

        self._lemmas = lemminflect.getAllLemmas

    def parts_of_speech(self, word: str) -> set[str]:
        word = word.lower()
        if word in CLOSED_CLASS:
            return {"CLOSED"}
        tags = set(self._lemmas(word))
        return tags or {"NOUN"}  # unknown open-class word: a name of a thing

    def can_be_noun(self, word: str) -> bool:
        return "NOUN" in self.parts_of_speech(word)

    def __call__(self, caption: str) -> Noun | None:
        words = list(_WORD.finditer(caption))
        for i, match in enumerate(words):
            tags = self.parts_of_speech(match.group())
            if "NOUN" not in tags:
                continue
            following = words[i + 1].group() if i + 1 < len(words) else None
            if "ADJ" in tags and following is not None and self.can_be_noun(following):
                continue  # an adjective before the noun it modifies
            return Noun(match.group(), match.start(), match.end())
        return None


class SpacyFirstNoun:
    """First NOUN/PROPN token of a spaCy pipeline (e.g. `en_core_web_sm`, installed by the user)."""

    def __init__(self, model: str = "en_core_web_sm") -> None:
        try:
            import spacy

            self._nlp = spacy.load(model, disable=["ner", "lemmatizer"])
        except (ImportError, OSError) as error:
            raise ValueError(
                f"spaCy pipeline {model!r} is not available ({error}); install spacy and the "
                f"pipeline, or use finder='lexicon'"
            ) from error

    def __call__(self, caption: str) -> Noun | None:
        for token in self._nlp(caption):
            if token.pos_ in ("NOUN", "PROPN"):
                return Noun(token.text, token.idx, token.idx + len(token.text))
        return None


FINDERS: dict[str, Callable[[], FirstNounFinder]] = {"lexicon": LexiconFirstNoun, "spacy": SpacyFirstNoun}


def get_finder(finder: str | FirstNounFinder = "lexicon") -> FirstNounFinder:
    """A finder by name ("lexicon", "spacy") or any callable caption -> Noun | None."""
    if callable(finder):
        return finder
    if finder not in FINDERS:
        raise ValueError(f"unknown first-noun finder {finder!r}; known: {sorted(FINDERS)} or a callable")
    return FINDERS[finder]()


@dataclass(frozen=True)
class Target:
    noun: str  # the first noun of the caption
    token_id: int  # c: the first token of that noun
    token_index: int  # its index among the caption's tokens; the logit y^c is read one position earlier


def find_target(tokenizer, caption_ids: Sequence[int], finder: FirstNounFinder) -> Target | None:
    """Locate c in a caption given as the token ids the model generated.

    The caption text is rebuilt token by token, so each token's character span is
    known exactly, whatever the tokenizer does to spaces; the first token whose span
    reaches into the noun is c.
    """
    ends, text = [], ""
    for i in range(len(caption_ids)):
        text = tokenizer.decode(list(caption_ids[: i + 1]))
        ends.append(len(text))
    noun = finder(text)
    if noun is None:
        return None
    for index, end in enumerate(ends):
        if end > noun.start:
            return Target(noun.word, int(caption_ids[index]), index)
    return None
