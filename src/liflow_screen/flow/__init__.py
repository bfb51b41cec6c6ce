"""LiFlow models and their use: graph batches, the modified PaiNN flow model, priors, the prior
selector and prior-class strategies, training, import of the published models, batched rollouts
(Algorithm 1)."""
