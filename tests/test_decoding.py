"""Unit decoding: a planted output direction decodes to its token, and scores equal W_out @ W_U."""

import mmn  # noqa: F401,I001  (torchvision shim before transformers)

import pytest
import torch

from mmn.analysis.decoding import decode_units, unit_token_scores
from mmn.models.lm import LanguageModel


@pytest.fixture(params=["gptj", "gpt2"])  # nn.Linear and Conv1D output projections
def lm(request, tiny_lm, tiny_tokenizer):
    torch.manual_seed(0)
    return LanguageModel(tiny_lm(request.param).eval(), tiny_tokenizer())


def test_planted_unit_decodes_to_its_token(lm):
    circle = lm.tokenizer.convert_tokens_to_ids("circle")
    with torch.no_grad():
        lm.unit_out_directions(1)[7] = 5.0 * lm.unembed.weight[circle]  # a view: writes the weights
    for final_norm in (False, True):
        assert decode_units(lm, 1, [7, 8], top_k=3, final_norm=final_norm)[0][0] == "circle"


def test_scores_are_output_weights_times_unembedding_over_real_tokens(lm):
    scores = unit_token_scores(lm, 0, [0, 5])
    assert scores.shape == (2, lm.vocab_size) and lm.vocab_size < lm.unembed.out_features
    expected = lm.unit_out_directions(0)[[0, 5]] @ lm.unembed.weight.T[:, : lm.vocab_size]
    torch.testing.assert_close(scores, expected)
    with pytest.raises(ValueError, match="top_k=0"):
        decode_units(lm, 0, [0], top_k=0)
