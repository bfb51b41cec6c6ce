"""Files: Parquet schemas, the results layout, atomic writes with provenance, integrity checks."""
