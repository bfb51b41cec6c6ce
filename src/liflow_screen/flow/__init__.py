"""LiFlow models: graph batches, the modified PaiNN flow model, priors, prior selector, training."""
