"""Training: recipes, the loop, stages, checkpoints, lr-find, precise BN and `fit`."""
