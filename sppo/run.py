"""`python -m sppo.run`: run SPPO iterations on the current Ray cluster.

Inside a Ray job (`ray job submit -- python -m sppo.run ...`) it uses that job's cluster;
run directly with no cluster it starts a local one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from sppo.config import ConfigError, load_config, parse_override
from sppo.logs import LOG_FORMAT, THIRD_PARTY_LOG, VERBOSE_ENV, job_runtime_env, quiet_driver, verbose


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sppo.run",
        description="Self-Play Preference Optimization on Ray: sample with vLLM, judge the candidates "
        "(judge.kind: a rule, PairRM or a reward model), train with DeepSpeed ZeRO-3, track in MLflow.",
        epilog="Exit status: 0 the run finished; 2 bad input, a failed check, an output directory in use "
        "or a stage that cannot fit the cluster (one 'error:' line, before any MLflow run or iteration "
        "output); 1 the job failed (a lost node, the tracking server gone past "
        "tracking.outage_limit_s, or any other error: re-submitting continues). Every config field, "
        "its type, default and meaning: docs/config-reference.md.",
    )
    parser.add_argument("--config", metavar="PATH", help="YAML run config (e.g. configs/tiny.yaml); "
                        "omitted fields take their defaults")
    parser.add_argument("--iters", type=int, metavar="N", help="number of SPPO iterations (config: iterations)")
    parser.add_argument("--resume-from", type=int, metavar="N",
                        help="redo iteration N onwards, starting from iteration N-1's checkpoint in the same "
                        "output directory and MLflow parent run; earlier outputs of N.. are moved aside, not deleted. "
                        "Without it, re-submitting with the same --output-dir continues an interrupted run")
    parser.add_argument("--output-dir", metavar="DIR",
                        help="where stage outputs and checkpoints go (config: output_dir); use an absolute "
                        "path under `ray job submit --working-dir`, whose working directory is temporary")
    parser.add_argument("--force", action="store_true",
                        help="continue in an output directory whose earlier iterations were made with a different "
                        "policy, K, judge or prompt source (refused by default, since the run would mix lineages)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field by its dotted name, e.g. --set train.learning_rate=1e-6 "
                        "(repeatable; values are parsed as YAML)")
    parser.add_argument("--plan", action="store_true",
                        help="print each stage's resources (engines, judge, training workers), check them against "
                        "the running cluster (or the --node descriptions), run the run's checks, and exit "
                        "without running or downloading anything. Checks that need what the cluster reaches "
                        "(hub models and hf: datasets, the tracking server, the output directory) are made "
                        "where they answer here, else printed as 'not checked here: ...'. Exit status: 0 fits; "
                        "1 a stage does not fit; 2 bad input or a failed check; 3 nothing to check against "
                        "(no running cluster and no --node) or, with --strict, a check not made here")
    parser.add_argument("--strict", action="store_true",
                        help="with --plan: a check not made here counts in the exit status (3)")
    parser.add_argument("--verbose", action="store_true",
                        help="stream the engines', judge's and trainers' third-party output (vLLM, DeepSpeed, "
                        "transformers) into the job's log too; by default it goes to sppo-third-party-<pid>.log "
                        "files beside Ray's worker logs (also SPPO_VERBOSE=1)")
    parser.add_argument("--node", dest="nodes", action="append", default=[], metavar="[Nx] RES=N,...",
                        help="with --plan: describe the cluster instead of connecting to one, e.g. "
                        "--node '2x CPU=96,GPU=8' (repeatable, one description per node type)")
    return parser


def one_line(err: Exception) -> str:
    """A user error as the single line it is reported in (library messages may span several)."""
    return " ".join(str(err).split())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stdout)
    if args.verbose:
        os.environ[VERBOSE_ENV] = "1"
    try:
        overrides = dict(parse_override(text) for text in args.overrides)
        if args.iters is not None:
            overrides["iterations"] = args.iters
        if args.output_dir is not None:
            overrides["output_dir"] = args.output_dir
        cfg = load_config(args.config, overrides)
    except ConfigError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    quiet_driver()  # after the config, so that a config error stays fast; before MLflow is imported
    from sppo.lease import LeaseError, OutputLease
    from sppo.manifest import LineageError
    from sppo.preflight import PreflightError, check_run, preflight

    if args.strict and not args.plan:
        print("error: --strict: only with --plan", file=sys.stderr)
        return 2
    unchecked = []
    try:  # before any cluster or server is touched; --plan writes nothing
        if args.plan:
            unchecked = check_run(cfg, args.resume_from, plan=True)
        else:
            preflight(cfg, args.resume_from, args.force)
    except (PreflightError, LineageError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    if args.plan:
        from sppo.plan import plan_main

        return plan_main(cfg, args.nodes, [one_line(line) for line in unchecked], args.strict)

    lease = OutputLease.for_run(Path(cfg.output_dir), cfg.storage_uri, cfg.timeouts.lease_s)
    try:  # one job per output directory, before any Ray work
        lease.acquire()
    except LeaseError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    try:
        return run_job(cfg, args.resume_from, args.force)
    finally:
        lease.release()


def run_job(cfg, resume_from: int | None, force: bool) -> int:
    """The job itself, on the Ray cluster this process reaches (or a new local one)."""
    import ray

    from sppo.cluster import NodeLostError
    from sppo.controller import run_sppo
    from sppo.plan import PlacementError
    from sppo.tracking import LARGE_ARTIFACT_ENV, answers, retry_env, run_links

    # Every MLflow client of the job (driver and training workers) retries for outage_limit_s;
    # values the submission set itself are kept (and Ray refuses to set them twice).
    retries = {k: v for k, v in {**retry_env(cfg.tracking.outage_limit_s), **LARGE_ARTIFACT_ENV}.items()
               if k not in os.environ}
    os.environ.update(retries)
    ray.init(runtime_env=job_runtime_env(retries))
    if not verbose():
        logging.getLogger("sppo").info("third-party output of the job's actors goes to %s files in Ray's "
                                       "log directory (--verbose streams it here)",
                                       THIRD_PARTY_LOG.format(pid="<pid>"))
    uri = cfg.tracking.resolved_uri
    try:
        checkpoints = run_sppo(cfg, resume_from=resume_from, force=force, checked=True)
    except PlacementError as err:  # within seconds of the start, before anything is published
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except NodeLostError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    except Exception as err:
        if answers(uri):
            raise
        print(f"error: the MLflow tracking server {uri} did not answer for tracking.outage_limit_s="
              f"{cfg.tracking.outage_limit_s:g} s ({type(err).__name__}). Everything published so far is kept in "
              f"{Path(cfg.output_dir).resolve()}; once the server answers, submit the same command again to "
              "continue", file=sys.stderr)
        return 1
    print("SPPO finished. Checkpoints:")
    for t, path in enumerate(checkpoints, start=1):
        print(f"  iter-{t}: {path}")
    links = run_links(Path(cfg.output_dir).resolve())
    print(f"MLflow (experiment {cfg.tracking.experiment!r}): runs {links['runs']}")
    print(f"  per-iteration curves {links['curves']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
