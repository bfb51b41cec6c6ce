"""The trajectory dataset: the loader (labels, Δτ pair sampling) and the user's own trajectories."""
