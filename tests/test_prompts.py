"""Image-prompt decoding: a prompt along a token's input embedding decodes to that token, embedding
rows beyond the tokenizer are never returned, random prompts take the asked norm, and the KS test
is scipy's with a floor on the sample sizes."""

import mmn  # noqa: F401,I001  (torchvision shim before transformers)

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import ks_2samp

from mmn.analysis.prompts import MIN_KS_VALUES, decode_prompts, ks_test, random_prompts
from mmn.models.lm import LanguageModel


@pytest.fixture
def lm(tiny_lm, tiny_tokenizer):
    torch.manual_seed(0)
    return LanguageModel(tiny_lm("gptj").eval(), tiny_tokenizer())


def test_prompt_along_a_token_embedding_decodes_to_that_token(lm):
    words = ["circle", "red", "picture"]
    ids = lm.tokenizer.convert_tokens_to_ids(words)
    prompts = 80.0 * lm.embedding.weight[ids]  # [3, d_model]; LiMBeR-like norm, same direction
    decoded = decode_prompts(lm, prompts, top_k=3)
    assert [row[0] for row in decoded] == words
    assert all(len(row) == 3 for row in decoded)


def test_decodings_are_the_top_cosine_tokens_in_chunks(lm):
    prompts = torch.randn(5, lm.d_model)
    cosine = F.normalize(prompts, dim=-1) @ F.normalize(lm.embedding.weight[: lm.vocab_size], dim=-1).T
    expected = [[lm.tokenizer.decode([t]) for t in row] for row in cosine.topk(4, dim=-1).indices.tolist()]
    assert decode_prompts(lm, prompts, top_k=4) == expected
    assert decode_prompts(lm, prompts, top_k=4, chunk=2) == expected
    assert decode_prompts(lm, 0.01 * prompts, top_k=4) == expected  # norm-invariant


def test_rows_beyond_the_tokenizer_are_never_returned(lm):
    n_rows = lm.embedding.weight.shape[0]
    assert lm.vocab_size < n_rows
    prompts = torch.randn(n_rows - lm.vocab_size, lm.d_model)
    with torch.no_grad():
        lm.embedding.weight[lm.vocab_size :] = prompts  # the extra rows are exactly the prompts: cosine 1
    real = {lm.tokenizer.decode([t]) for t in range(lm.vocab_size)}
    for row in decode_prompts(lm, prompts, top_k=lm.vocab_size):
        assert sorted(row) == sorted(real)  # every real token once, nothing else


def test_bad_arguments(lm):
    with pytest.raises(ValueError, match=r"prompts must be \[n, d_model=32\], got \(2, 3, 32\)"):
        decode_prompts(lm, torch.randn(2, 3, lm.d_model))
    with pytest.raises(ValueError, match="top_k=0"):
        decode_prompts(lm, torch.randn(2, lm.d_model), top_k=0)
    with pytest.raises(ValueError, match=f"top_k={lm.vocab_size + 1}"):
        decode_prompts(lm, torch.randn(2, lm.d_model), top_k=lm.vocab_size + 1)


def test_random_prompts_norm_and_reproducibility():
    plain = random_prompts(6, 32, torch.Generator().manual_seed(1))
    assert plain.shape == (6, 32)
    torch.testing.assert_close(plain, random_prompts(6, 32, torch.Generator().manual_seed(1)), rtol=0, atol=0)
    assert not torch.equal(plain, random_prompts(6, 32, torch.Generator().manual_seed(2)))

    scaled = random_prompts(6, 32, torch.Generator().manual_seed(1), norm=80.0)
    torch.testing.assert_close(scaled.norm(dim=-1), torch.full((6,), 80.0))
    torch.testing.assert_close(F.normalize(scaled, dim=-1), F.normalize(plain, dim=-1))  # same directions
    norms = torch.arange(1.0, 7.0)
    torch.testing.assert_close(random_prompts(6, 32, torch.Generator().manual_seed(1), norm=norms).norm(dim=-1), norms)
    with pytest.raises(ValueError, match=r"one per prompt \[6\], got \(5,\)"):
        random_prompts(6, 32, torch.Generator(), norm=torch.ones(5))


def test_ks_test_orders_p_values_and_matches_scipy():
    rng = np.random.default_rng(0)
    a, same, shifted = rng.normal(0, 1, 300), rng.normal(0, 1, 200), rng.normal(1, 1, 200)
    result_same, result_shifted = ks_test(a, same), ks_test(torch.tensor(a), shifted.tolist())
    assert result_same["pvalue"] > 0.05 and result_shifted["pvalue"] < 1e-6
    assert result_shifted["statistic"] > result_same["statistic"]
    assert (result_same["n_a"], result_same["n_b"]) == (300, 200)
    expected = ks_2samp(a, shifted)
    assert result_shifted["statistic"] == pytest.approx(expected.statistic)
    assert result_shifted["pvalue"] == pytest.approx(expected.pvalue)


def test_ks_test_needs_enough_values():
    # the floor's reason: at MIN_KS_VALUES, separated samples are significant; one fewer, they cannot be
    low, high = np.arange(MIN_KS_VALUES), np.arange(MIN_KS_VALUES) + 10.0
    assert ks_test(low, high)["pvalue"] < 0.05
    assert ks_2samp(low[1:], high[1:]).pvalue >= 0.05
    with pytest.raises(ValueError, match=f"at least {MIN_KS_VALUES} values per sample, got 3 and 100"):
        ks_test([1.0, 2.0, 3.0], np.arange(100.0))
    with pytest.raises(ValueError, match="got 100 and 0"):
        ks_test(np.arange(100.0), [])
    with pytest.raises(ValueError, match="1-d samples"):
        ks_test(np.zeros((4, 4)), np.zeros(16))
