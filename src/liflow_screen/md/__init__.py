"""Reference MD engines: relaxation (``relax``: ASE FIRE, one structure), one NVT trajectory
(``integrate``: ASE Nosé–Hoover chain), batched MD and relaxation on the device (``batched``), the
potentials behind them (``potentials``). The stage that runs them on a manifest chunk is ``stages.run_md``.
"""
