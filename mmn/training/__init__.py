"""Training the projection with Lightning: the data (data.py: training pairs or cached features,
evaluation images), the LightningModule (module.py) and its callbacks (callbacks.py). The recipe
behind `python train.py` is mmn.recipes.train."""
