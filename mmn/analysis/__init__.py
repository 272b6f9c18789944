"""The paper's analyses of a trained captioner. So far: gradient attribution to MLP units
(attribution.py), decoding units (decoding.py) and ablating them (ablation.py)."""
