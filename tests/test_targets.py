"""First-noun selection and the target token c."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import PreTrainedTokenizerFast

from mmn.models.targets import LexiconFirstNoun, Noun, find_target, get_finder

CAPTIONS = {
    "a dog with a cat": "dog",
    "the facade of the cathedral": "facade",
    "a man surfing on a wave": "man",
    "a red circle next to a blue square": "circle",
    "A blue square": "square",
    "two large green stars above a small heart": "stars",
    "an orange hexagon, a purple cross and a red diamond": "hexagon",
    "a living room with a couch": "room",
    "there is a giraffe standing in the grass": "giraffe",
    "a tennis player swinging a racket": "tennis",
    "a skateboarder in the air": "skateboarder",
}


@pytest.fixture(scope="module")
def finder():
    return LexiconFirstNoun()


@pytest.mark.parametrize("caption, noun", CAPTIONS.items())
def test_first_noun_of_real_captions(finder, caption, noun):
    found = finder(caption)
    assert found is not None and found.word == noun
    assert caption[found.start : found.end] == noun


def test_caption_without_noun(finder):
    assert finder("of the and with") is None


@pytest.fixture(scope="module")
def tokenizer():
    # A byte-level BPE small enough that nouns split into several tokens.
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(list(CAPTIONS) * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe)


def test_target_token_is_first_token_of_the_noun(tokenizer):
    caption = " a red circle next to a blue square"
    ids = tokenizer.encode(caption)
    target = find_target(tokenizer, ids, get_finder("lexicon"))
    assert target.noun == "circle"
    # c is the first token whose text reaches into "circle", and the tokens before it spell " a red".
    prefix = tokenizer.decode(ids[: target.token_index])
    assert prefix.strip() == "a red"
    assert target.token_id == ids[target.token_index]
    assert "circle".startswith(tokenizer.decode([target.token_id]).strip())


def test_noun_split_into_several_tokens_gives_its_first_token():
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(["a"], trainers.BpeTrainer(vocab_size=260, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    characters = PreTrainedTokenizerFast(tokenizer_object=bpe)  # one token per character
    ids = characters.encode("a cathedral")
    target = find_target(characters, ids, get_finder("lexicon"))
    assert target.noun == "cathedral"
    assert characters.decode([target.token_id]) == "c"
    assert target.token_index == 2  # "a", " ", then "c"


def test_custom_finder_plugs_in(tokenizer):
    last_word = lambda text: Noun(text.split()[-1], text.rindex(text.split()[-1]), len(text))
    target = find_target(tokenizer, tokenizer.encode(" a dog with a cat"), get_finder(last_word))
    assert target.noun == "cat"


def test_unknown_finder_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown first-noun finder 'tagger9'"):
        get_finder("tagger9")


def test_first_noun_is_the_first_shape_on_shapes_world_captions(finder):
    from mmn.world.generator import PLURALS, describe, first_shape, scene_at

    for index in range(300):
        caption = describe(*scene_at(7, "eval", index))
        shape = first_shape(caption)
        assert finder(caption).word in (shape, PLURALS[shape]), caption
