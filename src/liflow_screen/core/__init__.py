"""Infrastructure every stage shares: config loading and typed settings, constants, errors,
geometry (neighbour lists, supercells), devices, seeds."""
