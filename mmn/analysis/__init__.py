"""The paper's analyses of a trained captioner. So far: gradient attribution to MLP units
(attribution.py) and ablating units (ablation.py)."""
