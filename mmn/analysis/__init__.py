"""The paper's analyses of a trained captioner: so far, ablating MLP units (ablation.py)."""
