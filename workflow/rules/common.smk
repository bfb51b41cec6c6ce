# Helpers shared by the rules: chunk lists come from the manifest (a checkpoint), never from a
# per-structure file list, so the DAG stays small at the 4,186-structure scale.
import pyarrow.parquet as _pq

from liflow_screen.io import layout


def manifest_path():
    return checkpoints.structures.get().output.manifest


def md_chunks():
    """MD chunk indices (manifest column `chunk`, md.chunk_size structures each)."""
    col = _pq.read_table(manifest_path(), columns=["chunk"]).column("chunk").to_pylist()
    return sorted(set(col))


def rollout_chunks():
    """Rollout chunk indices: manifest rows in blocks of rollout.chunk_size."""
    n = _pq.ParquetFile(manifest_path()).metadata.num_rows
    size = S.rollout.chunk_size
    return list(range((n + size - 1) // size))


chunk_str = layout.chunk_str


def section(name):
    """A config section as JSON (as validated): a param, so a change of it re-runs the rule
    (rerun-triggers)."""
    return json.dumps(CFG[name], sort_keys=True)


def propagator_variant(variant):
    """The Propagator a rollout variant uses ("adaptive-noC" -> "adaptive")."""
    return variant.removesuffix(NO_CORRECTOR)


def propagator_file(variant):
    v = propagator_variant(variant)
    if v == "published":
        return f"{R}/models/published/propagator.pt"
    return f"{R}/train/propagator_{v}/best.pt"


def corrector_files(variant):
    """[] or [the Corrector checkpoint] a rollout variant uses."""
    if (
        not S.rollout.corrector
        or variant == "regressor"
        or variant.endswith(NO_CORRECTOR)
    ):
        return []
    if variant == "published":
        return [f"{R}/models/published/corrector.pt"] if S.pretrained.corrector else []
    return [f"{R}/train/corrector/best.pt"]


def rollout_model_files():
    """The flow-model checkpoints of every rollout variant (their SHA-256 go into the reports)."""
    files = []
    for v in ROLL_VARIANTS:
        for f in [propagator_file(v)] + corrector_files(v):
            if f not in files:
                files.append(f)
    return files


def rollout_chunk_files(name):
    """``name`` (status.parquet, priors.parquet) of every rollout chunk of every variant."""
    return [
        f"{R}/rollout/{v}/chunk_{chunk_str(k)}/{name}"
        for v in ROLL_VARIANTS
        for k in rollout_chunks()
    ]


def report_analysis_inputs(wildcards):
    ref = [f"{R}/analysis/md/chunk_{chunk_str(k)}.parquet" for k in md_chunks()]
    gen = [
        f"{R}/analysis/{v}/chunk_{chunk_str(k)}.parquet"
        for v in ROLL_VARIANTS
        for k in rollout_chunks()
    ]
    return ref + gen


# Corrupt intermediates (truncated / overwritten Parquet files) are moved aside before the DAG is
# built, so the jobs that made them run again instead of their outputs being used. In the main
# process only, and not in a dry run (Snakemake's own flag, set before parsing): a dry run and a
# cluster job's re-parse touch no file. (--lint, --summary and --dag do move them: the repair a
# real run would make, and what they then report.)
if MAIN_PROCESS and not workflow.output_settings.dryrun and Path(R).exists():
    from liflow_screen.io import verify as _verify

    for _f in _verify.quarantine(R):
        print(
            f"liflow-screen: corrupt {_f} moved aside; it will be rebuilt",
            file=sys.stderr,
        )
