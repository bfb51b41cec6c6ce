"""Report engines: analysis-table columns and readers, per-trajectory analysis, Table-1 metrics,
ranking, plots. The stages that use them are ``stages.run_analyze`` and ``stages.run_report``.
"""
