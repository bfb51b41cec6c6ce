"""Pipeline stages: ``liflow-screen <stage>`` runs ``stages/run_<stage>.py``, whose one entry point
``run`` (run_train also has ``run_selector``) takes the settings, the exact input files its rule
declares and the outputs to write. Stages are thin: the engines compute (``structures``, ``md``,
``dataset``, ``flow``, ``analysis``, ``report``), ``io`` reads and writes.

structures | trajectories -> md -> dataset -> train -> rollout -> analyze -> report
(import-model brings the published models in beside train)
"""
