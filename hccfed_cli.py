"""The `hccfed` command: parses arguments and calls client/, server/ and simulation/.

    hccfed synth     [--out DIR] [--seed N]          write the synthetic hospitals
    hccfed prepare   --site site_configs/X.yaml      prepare one hospital's data (cached)
    hccfed simulate  [--rounds N] [--seed N] ...     the main job: synth, prepare, federate, report
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _synth(args: argparse.Namespace) -> int:
    from simulation.cohort import synthesize_cohort

    info = synthesize_cohort(Path(args.out), seed=args.seed, tabular_only=args.tabular_only,
                             workers=args.workers, progress=True)
    print(f"wrote the synthetic cohort to {args.out}: {info.get('counts', info)}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from client.prepare import prepare_site
    from common.config import load_site_config

    config = load_site_config(args.site)
    site = prepare_site(config, workers=args.workers)
    print(f"{config.site_id}: {len(site)} patients prepared; cache in {config.cache_dir}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from simulation.simulate import SimulationSettings, simulate

    defaults = SimulationSettings()
    settings = SimulationSettings(
        data_dir=Path(args.data_dir) if args.data_dir else defaults.data_dir,
        runs_dir=Path(args.runs_dir) if args.runs_dir else defaults.runs_dir,
        seed=args.seed, rounds=args.rounds, local_epochs=args.local_epochs,
        encoder_width=args.encoder_width, run_id=args.run_id, workers=args.workers,
        baselines=not args.no_baselines,
    )
    run_dir = simulate(settings)
    print(f"report: {run_dir / 'report.html'}\nmetrics: {run_dir / 'metrics.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hccfed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write the synthetic multi-hospital cohort")
    synth.add_argument("--out", default="data/synthetic", help="output folder (default: data/synthetic)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=2)
    synth.add_argument("--tabular-only", action="store_true", help="manifests and oracle, no volumes")
    synth.set_defaults(func=_synth)

    prepare = sub.add_parser("prepare", help="prepare one hospital's data for training (cached)")
    prepare.add_argument("--site", required=True, help="the hospital's YAML, e.g. site_configs/hospital_a.yaml")
    prepare.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    prepare.set_defaults(func=_prepare)

    simulate = sub.add_parser("simulate", help="the main job on the synthetic hospitals")
    simulate.add_argument("--rounds", type=int, default=30)
    simulate.add_argument("--local-epochs", type=int, default=1)
    simulate.add_argument("--encoder-width", type=int, default=12)
    simulate.add_argument("--seed", type=int, default=0)
    simulate.add_argument("--data-dir", default=None, help="synthetic cohort folder (default: data/synthetic)")
    simulate.add_argument("--runs-dir", default=None, help="where runs/<id>/ goes (default: runs)")
    simulate.add_argument("--run-id", default=None)
    simulate.add_argument("--workers", type=int, default=None)
    simulate.add_argument("--no-baselines", action="store_true", help="federated model only")
    simulate.set_defaults(func=_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"hccfed {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
