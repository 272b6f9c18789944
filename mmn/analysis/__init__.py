"""The paper's analyses of a trained captioner.

`python analyze.py` (run.py): captions and targets (captions.py), attribution to MLP units
(attribution.py), decoding (decoding.py) and the interpretable filter (filter.py), ranking
neurons (neurons.py), ablation (ablation.py), BERTScore (bertscore.py), result tables
(results.py) and figures (figures.py).

The recipes in experiments/: image-prompt decoding (prompts.py, with CLIPScore in clipscore.py),
neuron scores (scoring.py), receptive fields (receptive_fields.py), selectivity (selectivity.py)
and the comparison of runs (report.py)."""
