"""Command-line interface: ``liflow-screen <stage> ...``; Snakemake rules call these.

Every stage takes ``--config`` (a YAML file validated against the single schema). A LiflowError
(bad input, missing key, corrupt file) prints one ``error: ...`` line and exits with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .core.errors import LiflowError

if TYPE_CHECKING:
    from .core.settings import Settings

Handler = Callable[[argparse.Namespace, "Settings"], None]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Handler]] = {}


def command(name: str, help: str, args: Callable[[argparse.ArgumentParser], None]) -> Callable[[Handler], Handler]:
    """Register a subcommand: ``args`` adds its arguments, the decorated function runs it."""

    def deco(fn: Handler) -> Handler:
        _COMMANDS[name] = (help, args, fn)
        return fn

    return deco


# ----------------------------------------------------------------------------- stages


@command("validate-config", "validate a config file and print it with defaults filled", lambda p: None)
def _validate(ns: argparse.Namespace, settings: Settings) -> None:
    import yaml

    sys.stdout.write(yaml.safe_dump(dict(settings.config), sort_keys=False))


def _args_structures(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, type=Path, help="manifest Parquet to write")


@command("structures", "collect structures, build supercells, split by composition", _args_structures)
def _structures(ns: argparse.Namespace, settings: Settings) -> None:
    from .stages import run_structures

    run_structures.run(settings, ns.out)


def _args_trajectories(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trajectories", required=True, type=Path,
                   help="CSV: id, path, temperature_K[, frame_dt_fs, format, split] (paths relative to the CSV)")
    p.add_argument("--manifest-out", required=True, type=Path, help="structures manifest Parquet to write")
    p.add_argument("--out-dir", required=True, type=Path, help="MD-chunk folder to write (structures, status, frames)")


@command("trajectories", "bring your own trajectories: read, check, unwrap into an MD-chunk folder",
         _args_trajectories)
def _trajectories(ns: argparse.Namespace, settings: Settings) -> None:
    from .stages import run_trajectories

    run_trajectories.run(settings, ns.trajectories, ns.manifest_out, ns.out_dir)


def _args_md(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--chunk", required=True, type=int, help="manifest chunk index")
    p.add_argument("--out-dir", required=True, type=Path)


@command("md", "relax, describe and run reference MD for one manifest chunk", _args_md)
def _md(ns: argparse.Namespace, settings: Settings) -> None:
    from .stages import run_md

    run_md.run(settings, ns.manifest, ns.chunk, ns.out_dir, progress=True)


def _args_dataset(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--md-files", required=True, type=Path, nargs="+",
                   help="every MD chunk's structures.parquet, status.parquet and frames_T<K>.parquet files")
    p.add_argument("--out-dir", required=True, type=Path)


@command("dataset", "merge MD chunks into the Parquet trajectory dataset with labels", _args_dataset)
def _dataset(ns: argparse.Namespace, settings: Settings) -> None:
    from .stages import run_dataset

    run_dataset.run(settings, ns.manifest, ns.md_files, ns.out_dir)


def _args_selector(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="selector model file (.pt)")
    p.add_argument("--report", required=True, type=Path, help="accuracy / confusion matrices (JSON)")


@command("train-selector", "train the prior-selector classifiers (Li, frame)", _args_selector)
def _train_selector(ns: argparse.Namespace, settings: Settings) -> None:
    from .stages import run_train

    run_train.run_selector(settings, ns.dataset, ns.out, ns.report)


def _args_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, type=Path)
    p.add_argument("--kind", required=True, choices=["propagator", "corrector"])
    p.add_argument("--variant", required=True, help="adaptive | uniform | isotropic | regressor (corrector: corrector)")
    p.add_argument("--selector", type=Path, default=None, help="prior selector (adaptive prior)")
    p.add_argument("--out-dir", required=True, type=Path)
    p.add_argument("--max-steps", type=int, default=None, help="override train.max_steps")
    p.add_argument("--init-from", type=Path, default=None, help="flow-model checkpoint to fine-tune (train.init_from)")


@command("train", "train a Propagator or the Corrector (conditional flow matching)", _args_train)
def _train(ns: argparse.Namespace, settings: Settings) -> None:
    from .stages import run_train

    run_train.run(settings, ns.dataset, ns.kind, ns.variant, ns.out_dir, selector=ns.selector, max_steps=ns.max_steps,
              init_from=ns.init_from)


def _args_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["propagator", "corrector"], default=None,
                   help="import the config's pretrained.<kind> (resolved: explicit path, cache, the "
                        "shipped copy of the universal models, download)")
    p.add_argument("--name", default=None, help="a published model (P_universal, C_universal, P_LGPS, ...)")
    p.add_argument("--checkpoint", type=Path, default=None,
                   help="a Lightning .ckpt file to import (or an already imported .pt: copied)")
    p.add_argument("--element-index", type=Path, default=None, help="the dataset's element_index.npy")
    p.add_argument("--delta-tau-ps", type=float, default=None, help="Δτ of the model, ps (known for published files)")
    p.add_argument("--out", required=True, type=Path, help="flow-model checkpoint (.pt) to write")


@command("import-model", "import a published LiFlow checkpoint into this project's model format", _args_import)
def _import_model(ns: argparse.Namespace, settings: Settings) -> None:
    from .stages import run_import_model

    run_import_model.run(settings, ns.out, kind=ns.kind, name=ns.name, checkpoint=ns.checkpoint,
                         element_index=ns.element_index, delta_tau_ps=ns.delta_tau_ps)


def _args_rollout(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--structures", required=True, type=Path, help="dataset structures.parquet (relaxed supercells)")
    p.add_argument("--selector", type=Path, default=None, help="prior selector (rollout.prior_selection: selector)")
    p.add_argument("--labels", type=Path, default=None, help="dataset labels.parquet (rollout.prior_selection: labels)")
    p.add_argument("--propagator", required=True, type=Path)
    p.add_argument("--corrector", type=Path, default=None)
    p.add_argument("--variant", required=True)
    p.add_argument("--chunk", required=True, type=int)
    p.add_argument("--out-dir", required=True, type=Path)


@command("rollout", "batched LiFlow rollouts (Algorithm 1) for one chunk of structures", _args_rollout)
def _rollout(ns: argparse.Namespace, settings: Settings) -> None:
    from .stages import run_rollout

    run_rollout.run(settings, ns.manifest, ns.structures, ns.selector, ns.propagator, ns.corrector, ns.variant,
                ns.chunk, ns.out_dir, labels_path=ns.labels)


def _args_analyze(p: argparse.ArgumentParser) -> None:
    p.add_argument("--structures", required=True, type=Path,
                   help="the cells the trajectories are of: dataset structures.parquet (MD) or the rollout chunk's")
    p.add_argument("--frames", required=True, type=Path, nargs="+", help="the chunk's frames_T<K>.parquet files")
    p.add_argument("--status", required=True, type=Path, help="the chunk's status.parquet")
    p.add_argument("--source", required=True, help="md or liflow:<variant>")
    p.add_argument("--out", required=True, type=Path)


@command("analyze", "MSD, kinisi D*, RDF for the trajectories of one chunk", _args_analyze)
def _analyze(ns: argparse.Namespace, settings: Settings) -> None:
    from .stages import run_analyze

    run_analyze.run(ns.frames, ns.structures, ns.out, settings=settings, status=ns.status,
                    sources=[ns.source])


def _args_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("--structures", required=True, type=Path, help="dataset structures.parquet")
    p.add_argument("--labels", type=Path, default=None, help="dataset labels.parquet (reference-MD prior classes)")
    p.add_argument("--analysis", required=True, type=Path, nargs="+", help="analysis tables (Parquet)")
    p.add_argument("--status", type=Path, nargs="*", default=[], help="status tables (MD dataset, rollout chunks)")
    p.add_argument("--priors", type=Path, nargs="*", default=[], help="priors tables of the rollout chunks")
    p.add_argument("--models", type=Path, nargs="*", default=[],
                   help="flow-model checkpoints the rollouts used (their SHA-256 go into the provenance)")
    p.add_argument("--out-dir", required=True, type=Path)


@command("report", "metrics.csv (Table 1 layout), ranking.csv, prior_classes.csv, spearman.csv and plots",
         _args_report)
def _report(ns: argparse.Namespace, settings: Settings) -> None:
    from .stages import run_report

    run_report.run(ns.analysis, ns.structures, ns.status, ns.priors, ns.out_dir, settings=settings,
                   variant=settings.analysis.ranking_variant, labels_table=ns.labels, models=ns.models)


def _args_verify(p: argparse.ArgumentParser) -> None:
    p.add_argument("--results", type=Path, default=None, help="results folder (default: config results_dir)")
    p.add_argument("--deep", action="store_true", help="decode every page and check schemas (slower)")
    p.add_argument("--delete", action="store_true", help="move corrupt files aside so the workflow rebuilds them")


@command("verify", "check workflow outputs for corrupt Parquet files (exit 1 if any)", _args_verify)
def _verify(ns: argparse.Namespace, settings: Settings) -> None:
    from .io import verify

    root = ns.results or Path(settings.results_dir)
    bad = verify.check(root, deep=ns.deep)
    for f, reason in bad:
        print(f"corrupt: {f}: {reason}")
    if ns.delete:
        for f, reason in bad:
            verify.move_aside(f, reason)
    if bad:
        raise SystemExit(1)
    print(f"ok: no corrupt Parquet files under {root}")


# ----------------------------------------------------------------------------- plumbing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liflow-screen", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"liflow-screen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for name, (help_, add_args, _) in _COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--config", type=Path, default=Path("config.yaml"), help="YAML config (default: config.yaml)")
        p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
        p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
        add_args(p)
    return parser


def reproducible_math_env() -> None:
    """Make MKL (torch's CPU BLAS) give the same bits run to run for a given thread count.

    Without conditional numerical reproducibility MKL may pick kernels by memory alignment and
    change its thread count at run time, so two runs of the same rollout can differ in the last
    bits, which chaotic rollouts amplify. Must run before torch is imported; user settings win.
    """
    os.environ.setdefault("MKL_CBWR", "AUTO")
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # e3nn 0.4.4 under torch >= 2.6
    reproducible_math_env()
    parser = build_parser()
    ns = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))  # under torchrun only process 0 logs below warnings
    logging.basicConfig(level=logging.DEBUG if ns.verbose else logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s{f' [rank {rank}]' if rank else ''} %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("matplotlib", "PIL", "urllib3", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from .core.settings import Settings

    if ns.threads:
        os.environ["OMP_NUM_THREADS"] = str(ns.threads)
        if "torch" in sys.modules or ns.command in ("md", "train", "rollout", "train-selector", "analyze",
                                                    "import-model"):
            import torch

            torch.set_num_threads(ns.threads)
    try:
        settings = Settings.load(ns.config)
        _COMMANDS[ns.command][2](ns, settings)
    except LiflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
