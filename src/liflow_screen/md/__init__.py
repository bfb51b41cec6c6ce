"""Reference MD engines: relaxation (``relax``), one NVT trajectory (``integrate``), lock-step
batched MD (``lockstep``). The stage that runs them on a manifest chunk is ``stages.run_md``.
"""
