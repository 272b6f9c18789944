"""The interpretability library: tensors, models and plain arguments in, tensors and tables out
(no configs; the recipes in mmn.recipes compose these).

    captions.py          greedy captions, the target c and p(c)
    attribution.py       gradient, integrated gradients and activation scores of every MLP unit
    neurons.py           caption and attribute a batch; top triples, unit rankings, decodings
    decoding.py          a unit's decoding (W_out W_U) and the paper's token strings
    filter.py            the interpretable filter
    ablation.py          zero / mean ablation of unit sets, the batched sweep
    receptive_fields.py  activation maps on the patch grid, receptive fields, IoU with masks
    prompts.py           image-prompt decoding, random baselines, the KS test, Table 2
    scoring.py           CLIPScore + BERTScore of texts, Table 1
    selectivity.py       category splits and the selectivity matrix (S.4)
    clipscore.py, bertscore.py   the scorers
    results.py           the resumable, sharded result store
    figures.py, compare.py       figures, and the comparison of finished runs
"""
