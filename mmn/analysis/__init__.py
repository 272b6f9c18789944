"""The paper's analyses of a trained captioner (`python analyze.py`, run.py): captions and targets
(captions.py), attribution to MLP units (attribution.py), decoding (decoding.py) and the
interpretable filter (filter.py), ranking neurons (neurons.py), ablation (ablation.py), BERTScore
(bertscore.py), result tables (results.py) and figures (figures.py)."""
