"""The `hccfed` command: parses arguments and calls client/, server/ and simulation/.

    hccfed synth     [--out DIR] [--seed N] [--dicom] write the synthetic hospitals (NIfTI or DICOM)
    hccfed validate  --site site_configs/X.yaml      every check of a hospital's data, nothing prepared
    hccfed prepare   --site site_configs/X.yaml      prepare one hospital's data (cached, QC report)
    hccfed site check --site site_configs/X.yaml [--root-certificates CA.pem] [--auth-key KEY.pem] [--json]
                                                     a hospital's readiness before it joins (exit 1: a check failed)
    hccfed simulate  [--rounds N] [--seed N] ...     the main job: synth, prepare, federate, report
                     [--external SITE]               ... leave SITE out of training and test on all of it
    hccfed pretrain  [--encoder cnn|vit] [--pretrain-rounds N] [--archive N] [--flower]  federated self-
                                                     supervised pretraining (cnn: masked autoencoder; vit: DINO +
                                                     registers), in process or as the ServerApp's pretrain job
    hccfed benchmark [--quick] [--seeds 1,2,3,4] [--holdout N] [--encoders cnn,vit] [--device cuda]
                                                     rank the models on large held-out cohorts over seeds
    hccfed site-summary --predictions preds.csv --out site.json [--site-id X] [--pooled round2/X.json]
                                                     a hospital's aggregate-only evaluation summary
    hccfed pool-summaries site1.json site2.json ... --out report_dir [--threshold [MODEL=]T]
                                                     pooled clinical figures (figures.json)
    hccfed stats     [--harmonize] [--seed N] ...     CR / R / RCR by federated statistics over Flower
    hccfed admin coordinator --out DIR --host NAME [--sites a,b,c]
                                                     the consortium CA, the SuperLink's certificate, the commands
    hccfed admin site-key --out DIR --site SITE      a site's node-authentication key pair (at the site)

Exit codes of validate and prepare: 0 done (validate: every patient passes); 1 validate: some patient
would be excluded (see the table); 2 the site cannot be used (bad YAML, unusable manifest, an output
inside the data folder): one message naming the file and key or row, nothing done; 3 prepare: no
patient could be prepared; 4 an unexpected error (reported without a traceback; please file it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _synth(args: argparse.Namespace) -> int:
    from hccfed.simulation.cohort import synthesize_cohort

    info = synthesize_cohort(Path(args.out), seed=args.seed, tabular_only=args.tabular_only,
                             workers=args.workers, progress=True)
    print(f"wrote the synthetic cohort to {args.out}: {info.get('counts', info)}")
    if args.dicom:
        from hccfed.simulation.dicom_export import export_site_dicom

        if args.tabular_only:
            raise ValueError("--dicom needs the volumes: leave out --tabular-only")
        for site_id in info["counts"]:
            manifest = export_site_dicom(Path(args.out) / site_id, remove_nifti=True, progress=True)
            print(f"{site_id}: phases written as DICOM series under {manifest.parent / 'dicom'}; "
                  f"manifest {manifest} points at them")
    return 0


EXIT_OK, EXIT_EXCLUDED, EXIT_SITE_ERROR, EXIT_NOTHING_PREPARED, EXIT_UNEXPECTED = 0, 1, 2, 3, 4


def _site_command(name: str, run) -> int:
    """Run a site command; every failure is one message on stderr and an exit code, never a traceback."""
    from hccfed.client.manifest import ManifestError
    from hccfed.client.prepare import PreparationError
    from hccfed.common.errors import ConfigError

    try:
        return run()
    except (ConfigError, ManifestError) as err:
        print(f"hccfed {name}: error: {err}", file=sys.stderr)
        return EXIT_SITE_ERROR
    except PreparationError as err:
        print(f"hccfed {name}: error: {err}", file=sys.stderr)
        return EXIT_NOTHING_PREPARED
    except OSError as err:  # e.g. the cache folder cannot be written
        where = f" {err.filename}" if err.filename else ""
        print(f"hccfed {name}: error: cannot access{where}: {err.strerror or err}", file=sys.stderr)
        return EXIT_SITE_ERROR
    except Exception as err:  # noqa: BLE001 (the last resort: still no traceback for the data manager)
        print(f"hccfed {name}: unexpected error ({type(err).__name__}: {err}); nothing was written into the "
              "data folder; please report this message", file=sys.stderr)
        return EXIT_UNEXPECTED


def _print_issues(report, limit: int = 20) -> None:
    for issue in report.issues[:limit]:
        print(f"  - {issue.describe()}")
    if len(report.issues) > limit:
        print(f"  ... and {len(report.issues) - limit} more")


def _prepare(args: argparse.Namespace) -> int:
    from hccfed.client.prepare import prepare_archive, prepare_site
    from hccfed.common.site_config import load_site_config

    def run() -> int:
        config = load_site_config(args.site)
        site = prepare_site(config, workers=args.workers)
        if site.qc is not None:
            print(site.qc.summary())
            _print_issues(site.qc)
        print(f"{config.site_id}: {len(site)} patients prepared; cache in {config.cache_dir}; "
              f"QC report {config.cache_dir / 'qc_report.csv'} (and .json)")
        scans = prepare_archive(config, workers=args.workers)  # the scans without outcomes, for pretraining
        if scans is not None:
            print(scans.qc.summary())
            _print_issues(scans.qc)
            print(f"{config.site_id} archive: {len(scans)} scans prepared for pretraining; QC report "
                  f"{config.archive_site().cache_dir / 'qc_report.csv'} (and .json)")
        return EXIT_OK

    return _site_command("prepare", run)


def _validate(args: argparse.Namespace) -> int:
    from hccfed.client.site_validation import check_outputs, validate_site
    from hccfed.common.site_config import load_site_config

    def run() -> int:
        config = load_site_config(args.site)
        report_dir = Path(args.report) if args.report else None
        if report_dir is not None:
            check_outputs(config, report_dir, report_dir / "qc_report.csv", report_dir / "qc_report.json")
        report = validate_site(config, workers=args.workers, progress=True)
        print(report.summary(verb="pass every check"))
        print(report.reason_table())
        _print_issues(report, args.show)
        if report_dir is not None:
            csv_path, _ = report.write(report_dir)
            print(f"report: {csv_path} (and .json)")
        excluded = bool(report.excluded)
        archive = config.archive_site()
        if archive is not None:
            scans = validate_site(archive, workers=args.workers, progress=True, scans_only=True)
            print(f"archive ({archive.manifest}): " + scans.summary(verb="pass every check"))
            print(scans.reason_table())
            _print_issues(scans, args.show)
            if report_dir is not None:
                csv_path, _ = scans.write(report_dir / "archive")
                print(f"archive report: {csv_path} (and .json)")
            excluded = excluded or bool(scans.excluded)
        return EXIT_EXCLUDED if excluded else EXIT_OK

    return _site_command("validate", run)


def _site_check(args: argparse.Namespace) -> int:
    import json

    from hccfed.client.site_check import check_site

    report = check_site(args.site, root_certificates=args.root_certificates, auth_key=args.auth_key,
                        workers=args.workers)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.table())
    return EXIT_OK if report.ok else 1


def _with_encoder_file(run):
    """The run with its --pretrained-encoder as an absolute path (the ServerApp runs in another folder),
    refused when the file is missing."""
    import dataclasses

    if not run.pretrained_encoder:
        return run
    path = Path(run.pretrained_encoder).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"--pretrained-encoder {run.pretrained_encoder}: no such file (hccfed pretrain writes it)")
    return dataclasses.replace(run, pretrained_encoder=str(path))


def _simulate(args: argparse.Namespace) -> int:
    from hccfed.common.run_config import RunConfig, from_arguments
    from hccfed.simulation.simulate import SimulationSettings, simulate

    if args.resume and not args.run_id:
        raise ValueError("--resume needs --run-id naming the interrupted run's folder under the runs folder")
    settings = from_arguments(args, SimulationSettings, run=_with_encoder_file(from_arguments(args, RunConfig)))
    run_dir = simulate(settings)
    print(f"report: {run_dir / 'report.html'}\nmetrics: {run_dir / 'metrics.json'}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from hccfed.common.run_config import RunConfig, from_arguments
    from hccfed.simulation.benchmark import BenchmarkSettings, run_benchmark

    settings = from_arguments(args, BenchmarkSettings, run=from_arguments(args, RunConfig))
    out = run_benchmark(settings)
    print(f"table: {out / 'benchmark.md'}\nplot: {out / 'benchmark.png'}\nfigures: {out / 'benchmark.json'}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from hccfed.common.run_config import RunConfig, from_arguments
    from hccfed.simulation.pretraining import pretrain_demo
    from hccfed.simulation.settings import SimulationSettings

    settings = from_arguments(args, SimulationSettings, run=from_arguments(args, RunConfig))
    out = pretrain_demo(settings, args.pretrain_rounds, args.archive, Path(args.out) if args.out else None,
                        flower=args.flower)
    print(f"pretrained encoder: {out['path']}\nfine-tune from it: hccfed simulate --pretrained-encoder {out['path']}")
    return 0


def _minimum(args: argparse.Namespace):
    from hccfed.common.metrics.summary_checks import MinimumCells

    return MinimumCells(patients=args.min_patients, per_class=args.min_per_class)


def _site_summary(args: argparse.Namespace) -> int:
    from hccfed.client.site_summary_command import write_site_summary

    out = write_site_summary(args.predictions, args.out, site_id=args.site_id, pooled=args.pooled,
                             epsilon=args.epsilon, test_noise_seed=args.test_noise_seed, force=args.force, minimum=_minimum(args),
                             dp_score_range=args.dp_score_range)
    print(f"wrote the site summary (tables of counts only, no patient row) to {out}")
    return 0


def _pool_summaries(args: argparse.Namespace) -> int:
    from hccfed.server.pool_summaries_command import parse_thresholds, write_pool_report

    out = write_pool_report(args.summaries, args.out, thresholds=parse_thresholds(args.threshold),
                            minimum=_minimum(args))
    round2 = out.parent / "round2"
    print(f"figures: {out}" + (f"\nround-2 requests for paired tests (one per site): {round2}" if round2.is_dir() else ""))
    return 0


def _add_minimum_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--min-patients", type=int, default=10,
                        help="refuse a site summary of fewer patients (default 10)")
    parser.add_argument("--min-per-class", type=int, default=5,
                        help="refuse a site summary with fewer positives or negatives (default 5)")


def _stats(args: argparse.Namespace) -> int:
    from hccfed.common.run_config import RunConfig
    from hccfed.simulation.classical_models import stats_demo
    from hccfed.simulation.settings import SimulationSettings

    defaults = SimulationSettings()
    settings = SimulationSettings(data_dir=Path(args.data_dir) if args.data_dir else defaults.data_dir,
                                  runs_dir=Path(args.runs_dir) if args.runs_dir else defaults.runs_dir,
                                  run=RunConfig(seed=args.seed), workers=args.workers)
    out = stats_demo(settings, harmonize=args.harmonize, run_id=args.run_id)
    print(f"results: {out}\nmessages audit: {out.parent / 'messages_audit.jsonl'}")
    return 0


def _add_simulate_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulation's own flags, then the run's: both derived from their one definition
    (``SimulationSettings`` and ``RunConfig``'s fields)."""
    from hccfed.common.run_config import RunConfig, add_arguments
    from hccfed.simulation.settings import SimulationSettings

    add_arguments(parser, SimulationSettings)
    add_arguments(parser, RunConfig)


def _add_benchmark_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's own flags, then the models' (RunConfig's; the seed is the benchmark's)."""
    from hccfed.common.run_config import RunConfig, add_arguments
    from hccfed.simulation.benchmark import BenchmarkSettings

    add_arguments(parser, BenchmarkSettings)
    add_arguments(parser, RunConfig, exclude=("seed", "resume", "encoder", "pretrained_encoder", "cv_folds"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hccfed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write the synthetic multi-hospital cohort")
    synth.add_argument("--out", default="data/synthetic", help="output folder (default: data/synthetic)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--workers", type=int, default=2)
    synth.add_argument("--tabular-only", action="store_true", help="manifests and oracle, no volumes")
    synth.add_argument("--dicom", action="store_true",
                       help="write the phases as DICOM series folders (masks stay NIfTI), as a PACS export")
    synth.set_defaults(func=_synth)

    validate = sub.add_parser("validate", help="check one hospital's data (every rule, nothing prepared or written)")
    validate.add_argument("--site", required=True, help="the hospital's YAML, e.g. site_configs/hospital_a.yaml")
    validate.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    validate.add_argument("--report", default=None,
                          help="also write qc_report.csv / .json into this folder (outside the data folder)")
    validate.add_argument("--show", type=int, default=50, help="issues listed after the table (default 50)")
    validate.set_defaults(func=_validate)

    prepare = sub.add_parser("prepare", help="prepare one hospital's data for training (cached)")
    prepare.add_argument("--site", required=True, help="the hospital's YAML, e.g. site_configs/hospital_a.yaml")
    prepare.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    prepare.set_defaults(func=_prepare)

    site_group = sub.add_parser("site", help="a hospital's own commands: site check")
    site_commands = site_group.add_subparsers(dest="site_command", required=True)
    check = site_commands.add_parser("check", help="a hospital's readiness before it joins a federation (config, data, "
                                                   "prepared cache, privacy policy, cache folder, TLS files, GPU)")
    check.add_argument("--site", required=True, help="the hospital's YAML, e.g. site_configs/hospital_a.yaml")
    check.add_argument("--root-certificates", default=None, help="the consortium's CA certificate (PEM) the SuperNode uses")
    check.add_argument("--auth-key", default=None, help="the SuperNode's authentication private key (PEM, EC)")
    check.add_argument("--workers", type=int, default=None, help="processes for the data checks (default: all cores)")
    check.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    check.set_defaults(func=_site_check)

    simulate = sub.add_parser("simulate", help="the main job on the synthetic hospitals")
    _add_simulate_arguments(simulate)
    simulate.set_defaults(func=_simulate)
    pretrain = sub.add_parser("pretrain", help="federated self-supervised pretraining of the --encoder "
                              "(cnn: masked autoencoder; vit: DINO with register tokens) on the synthetic "
                              "hospitals' scans")
    pretrain.add_argument("--pretrain-rounds", type=int, default=20, help="federated rounds (default: 20)")
    pretrain.add_argument("--archive", type=int, default=0, help="unlabelled scans per hospital in its archive, "
                          "pretrained on beside the training split (default: 0)")
    pretrain.add_argument("--out", help="the encoder file (default: <runs>/pretrain/encoder.pt)")
    pretrain.add_argument("--flower", action="store_true", help="run the ServerApp's pretrain job over Flower "
                          "(one SuperNode per hospital, as deployed) instead of in process; the encoder goes to "
                          "<runs>/pretrain-flower-<time>/job/encoder.pt (and --out)")
    _add_simulate_arguments(pretrain)
    pretrain.set_defaults(func=_pretrain)
    benchmark = sub.add_parser("benchmark", help="rank the models: several cohort seeds, each hospital's large "
                               "held-out cohort (table and plot)")
    _add_benchmark_arguments(benchmark)
    benchmark.set_defaults(func=_benchmark)

    site = sub.add_parser("site-summary", help="a hospital's aggregate-only evaluation summary of a predictions CSV")
    site.add_argument("--predictions", required=True,
                      help="CSV: patient_id, label, time, event, score_<model>... [prob_<model>...]")
    site.add_argument("--out", required=True, help="the JSON to write (never the CSV; an existing file only with --force)")
    site.add_argument("--site-id", default=None, help="name of the site (default: the CSV's file name)")
    site.add_argument("--pooled", default=None,
                      help="this site's round2/<site-id>.json from pool-summaries: adds the sums for paired DeLong tests")
    site.add_argument("--force", action="store_true", help="replace --out when it exists")
    site.add_argument("--epsilon", type=float, default=None,
                      help="differential privacy: Laplace noise on a coarse grid, pure epsilon-DP (delta 0) under "
                           "add / remove one patient; each model costs 3 x epsilon; the noise comes from OS entropy "
                           "and the pooled intervals account for it")
    site.add_argument("--dp-score-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                      help="with --epsilon: the scores' range, declared beforehand (default -5 5); a score outside "
                           "it stops the release")
    site.add_argument("--test-noise-seed", type=int, default=None, metavar="N",
                      help="TEST MODE ONLY: seed the noise so the summary is reproducible; anyone who knows the seed "
                           "can remove the noise, so such a summary is NOT private (it is marked so)")
    _add_minimum_arguments(site)
    site.set_defaults(func=_site_summary)

    pool = sub.add_parser("pool-summaries", help="pooled clinical figures from the sites' summaries")
    pool.add_argument("summaries", nargs="+", help="site summary JSON files")
    pool.add_argument("--out", required=True, help="folder for figures.json, report.html and round2/")
    pool.add_argument("--threshold", action="append", default=None, metavar="[MODEL=]VALUE",
                      help="the score threshold of the operating point, declared before pooling (e.g. chosen on a "
                           "development set); repeat as MODEL=VALUE for one per model")
    _add_minimum_arguments(pool)
    pool.set_defaults(func=_pool_summaries)

    stats = sub.add_parser("stats", help="the classical CR / R / RCR models by federated statistics over Flower "
                                         "on the synthetic hospitals")
    stats.add_argument("--harmonize", action="store_true", help="harmonise the radiomics by federated ComBat first")
    stats.add_argument("--seed", type=int, default=0, help="cohort and split seed (default 0)")
    stats.add_argument("--data-dir", default=None, help="synthetic cohort folder (default: data/synthetic)")
    stats.add_argument("--runs-dir", default=None, help="where runs/<id>/ goes (default: runs)")
    stats.add_argument("--run-id", default=None)
    stats.add_argument("--workers", type=int, default=None,
                       help="processes for a missing cohort and the radiomics (default: all cores)")
    stats.set_defaults(func=_stats)

    admin = sub.add_parser("admin", help="deployment helpers: certificates, node keys, the exact commands")
    admin_sub = admin.add_subparsers(dest="admin_command", required=True)
    coordinator = admin_sub.add_parser("coordinator", help="the consortium CA and the SuperLink's TLS certificate "
                                                           "(valid for the given names and 127.0.0.1), and the commands")
    coordinator.add_argument("--out", required=True, help="folder for ca.pem, ca.key, superlink.pem, superlink.key")
    coordinator.add_argument("--host", action="append", required=True,
                             help="a name or address the sites use to reach the SuperLink (repeatable; the first "
                                  "goes into the printed commands)")
    coordinator.add_argument("--port", type=int, default=9092, help="the SuperLink's port (default 9092)")
    coordinator.add_argument("--sites", default="", help="comma-separated site ids of the roster (for the commands)")
    coordinator.add_argument("--reuse", action="store_true", help="print the commands for the files already in --out")
    coordinator.set_defaults(func=_admin_coordinator)
    site_key = admin_sub.add_parser("site-key", help="this site's node-authentication key pair (run at the site)")
    site_key.add_argument("--out", required=True, help="folder for SITE.key (owner-only) and SITE.pub")
    site_key.add_argument("--site", required=True, help="the site id of its YAML")
    site_key.set_defaults(func=_admin_site_key)
    return parser


def _admin_coordinator(args: argparse.Namespace) -> int:
    from hccfed.server.deployment import CoordinatorFiles, certificate_names, deployment_commands, \
        make_coordinator_certificates

    out = Path(args.out).resolve()  # the printed commands must work from any folder
    if args.reuse:
        files = CoordinatorFiles(out / "ca.pem", out / "ca.key", out / "superlink.pem", out / "superlink.key")
        missing = [str(p) for p in (files.ca_cert, files.cert, files.key) if not p.exists()]
        if missing:
            raise ValueError(f"--reuse: {', '.join(missing)} missing")
    else:
        files = make_coordinator_certificates(out, args.host)
        print(f"wrote {files.ca_cert} (give it to every site), {files.cert} and, owner-only, {files.key} and "
              f"{files.ca_key} (keep the CA key offline)")
    print(f"the SuperLink's certificate is valid for: {', '.join(certificate_names(files.cert))}\n")
    sites = [s for s in args.sites.split(",") if s]
    print(deployment_commands(files, args.host[0], sites or ["SITE"], port=args.port))
    return 0


def _admin_site_key(args: argparse.Namespace) -> int:
    from hccfed.client.node_key import make_site_key

    private, public = make_site_key(Path(args.out), args.site)
    print(f"wrote {private} (owner-only: it stays at this site; flower-supernode --auth-supernode-private-key) "
          f"and {public} (send it to the coordinator for `flwr supernode register`)")
    return 0


def configure_logging() -> None:
    """Progress lines on stderr as ``[hccfed HH:MM:SS] message``; the library only logs."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[hccfed %(asctime)s] %(message)s", datefmt="%H:%M:%S"))
    root = logging.getLogger("hccfed")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        print(f"hccfed {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
