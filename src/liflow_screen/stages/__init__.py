"""Pipeline stages, one module per stage, each with one entry point ``run`` (train also has
``run_selector``) that takes the config, the exact input files its rule declares and the outputs
to write. Engines (``md``, ``rollout``, ``report``, ``analysis``, ``model``) do the computing.

structures -> md -> dataset -> train -> rollout -> analyze -> report
"""
