"""Submit an SPPO run (or any entrypoint) as a Ray job, follow its log, exit with its status.

    python -m ray_jobs.submit --address http://<head>:8265 --mlflow-uri http://<mlflow>:5000 \\
        --hf-home /shared/hf -- python -m sppo.run --config configs/gemma-2-9b-it-sppo.yaml --iters 3

Built on Ray's `JobSubmissionClient`. The runtime environment is `ray_jobs/runtime_env.yaml`
(working directory and its excludes) plus MLFLOW_TRACKING_URI, HF_HOME and the secrets found in
the caller's environment (`sppo.secrets.passed_to_jobs`). Secret values are sent to the cluster but never
printed or logged: only their names are shown, and any value that appears in the job's log is
masked before the log is echoed. Exit status: 0 when the job SUCCEEDED, the driver's exit code
when it FAILED (1 if Ray has none), 1 when it was STOPPED, 2 for bad input of its own (nothing
submitted), 130 when following is interrupted (the job keeps running). Run it from the
repository root: ray_jobs is not an installed package.

Pure core: `secrets_from`, `build_runtime_env`, `exit_status`, `SecretMasker`. Ray shell: `main`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from sppo.secrets import MASK, is_secret, passed_to_jobs, redact

DEFAULT_RUNTIME_ENV = Path(__file__).resolve().parent / "runtime_env.yaml"
# Ray's terminal job states, and the exit status each gives (FAILED: the driver's own code).
_STOPPED_STATUS = 1
_INTERRUPTED_STATUS = 130


def secrets_from(environ: Mapping[str, str], extra_names: Iterable[str] = ()) -> dict[str, str]:
    """The caller's secrets: every set variable that `passed_to_jobs`, plus the named extras.

    A named extra that is not set is an error: the job would fail later without it.
    """
    missing = [name for name in extra_names if name not in environ]
    if missing:
        raise ValueError(f"--secret {', '.join(missing)}: not set in this environment")
    names = {n for n in environ if passed_to_jobs(n)} | set(extra_names)
    return {name: environ[name] for name in sorted(names) if environ[name]}


def load_runtime_env(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ValueError(f"runtime env {path}: cannot read ({err.strerror})") from err
    except yaml.YAMLError as err:
        raise ValueError(f"runtime env {path}: malformed YAML: {err}") from err
    if not isinstance(loaded, dict):
        raise ValueError(f"runtime env {path}: top level must be a mapping (working_dir, excludes, env_vars)")
    return loaded


def build_runtime_env(
    base: Mapping[str, Any],
    *,
    working_dir: str | None = None,
    env_vars: Mapping[str, str | None] | None = None,
    secrets: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The job's runtime env: `base` (runtime_env.yaml) with the working directory resolved to an
    absolute path, then env_vars (None values left out), then secrets, later ones winning."""
    env = dict(base)
    workdir = working_dir if working_dir is not None else env.get("working_dir")
    if workdir is not None:
        path = Path(workdir).expanduser()
        if not path.is_dir():
            raise ValueError(f"working_dir {workdir}: not a directory")
        env["working_dir"] = str(path.resolve())
    merged = {str(k): str(v) for k, v in (base.get("env_vars") or {}).items()}
    merged.update({k: v for k, v in (env_vars or {}).items() if v is not None})
    merged.update(secrets or {})
    env["env_vars"] = merged
    return env


def exit_status(status: str, driver_exit_code: int | None) -> int:
    """The helper's exit status for a terminal job status."""
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED":
        return driver_exit_code if driver_exit_code else 1
    if status == "STOPPED":
        return _STOPPED_STATUS
    raise ValueError(f"job status {status!r} is not terminal")


class SecretMasker:
    """Masks secret values in a stream of log chunks. Only whole lines are released, so a value
    split across two chunks is still caught; `flush` releases the rest at the end."""

    def __init__(self, secrets: Iterable[str]):
        # Longest first, so a secret that contains another is masked whole.
        self._values = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._pending = ""

    def mask(self, text: str) -> str:
        for value in self._values:
            text = text.replace(value, MASK)
        return text

    def feed(self, chunk: str) -> str:
        text = self._pending + chunk
        cut = text.rfind("\n") + 1
        self._pending = text[cut:]
        return self.mask(text[:cut])

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return self.mask(rest)


# ---------------------------------------------------------------- Ray shell


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ray_jobs.submit",
        usage="%(prog)s [options] -- ENTRYPOINT...",
        description="Submit a Ray job with the SPPO runtime environment, follow its log and exit "
        "with its status. Secrets in your environment (HF_TOKEN, HUGGING_FACE_HUB_TOKEN, AWS_*, "
        "MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN, *_API_KEY, and "
        "each --secret) are passed to the job and never printed. Run it from the repository root "
        "(ray_jobs is not an installed package; the working directory defaults to '.').",
        epilog="Exit status: 0 the job SUCCEEDED (or was submitted, with --no-wait); the driver's exit "
        "code when it FAILED (1 if Ray has none); 1 when it was STOPPED; 2 bad input here, nothing "
        "submitted; 130 when you stop following (the job keeps running).",
    )
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="the cluster's dashboard, e.g. http://<head>:8265 (default: $RAY_ADDRESS)")
    parser.add_argument("--runtime-env", type=Path, default=DEFAULT_RUNTIME_ENV, metavar="YAML",
                        help="base runtime env (default: ray_jobs/runtime_env.yaml)")
    parser.add_argument("--working-dir", metavar="DIR",
                        help="directory uploaded as the job's working directory (default: the runtime "
                        "env's working_dir, relative to the current directory)")
    parser.add_argument("--mlflow-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                        help="MLFLOW_TRACKING_URI for the job (default: yours)")
    parser.add_argument("--hf-home", metavar="DIR",
                        help="HF_HOME for the job: a model cache path on storage every node sees "
                        "(your own HF_HOME is not passed: it is a path on this machine)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="another (non-secret) environment variable for the job; repeatable")
    parser.add_argument("--secret", action="append", default=[], metavar="NAME",
                        help="pass this variable of your environment as a secret too; repeatable")
    parser.add_argument("--entrypoint-num-cpus", type=float, default=0.0,
                        help="CPUs reserved for the driver (default 0: it only coordinates; every "
                        "stage reserves its own resources)")
    parser.add_argument("--entrypoint-num-gpus", type=float, default=0.0, help="GPUs reserved for the driver")
    parser.add_argument("--entrypoint-memory", type=int, metavar="BYTES", help="memory reserved for the driver")
    parser.add_argument("--entrypoint-resources", type=json.loads, metavar="JSON",
                        help='custom resources for the driver, e.g. \'{"head": 1}\' to pin it to a node')
    parser.add_argument("--submission-id", help="job id (default: generated by Ray)")
    parser.add_argument("--no-wait", action="store_true", help="submit and exit without following the log")
    return parser


def split_entrypoint(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" not in argv:
        return argv, []
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def parse_env(pairs: Iterable[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--env {pair!r}: expected NAME=VALUE")
        if is_secret(name):
            how = "it is passed" if passed_to_jobs(name) else f"pass it with --secret {name}"
            raise ValueError(f"--env {name}: a secret's value does not belong on a command line; export it and {how}")
        out[name] = value
    return out


async def _follow(client, job_id: str, masker: SecretMasker) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(masker.feed(chunk))
        sys.stdout.flush()
    sys.stdout.write(masker.flush())


def _wait_terminal(client, job_id: str, poll_s: float = 1.0):
    """The job's info once its status is terminal (the log can close a moment before)."""
    while True:
        info = client.get_job_info(job_id)
        if info.status.is_terminal():
            return info
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    options, entrypoint = split_entrypoint(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(options)
    if not entrypoint:
        parser.error("no entrypoint: put the job's command after --, e.g. -- python -m sppo.run --config ...")
    if not args.address:
        parser.error("no cluster: pass --address http://<head>:8265 or set RAY_ADDRESS")
    try:
        secrets = secrets_from(os.environ, args.secret)
        env_vars = {"MLFLOW_TRACKING_URI": args.mlflow_uri, "HF_HOME": args.hf_home, **parse_env(args.env)}
        runtime_env = build_runtime_env(load_runtime_env(args.runtime_env), working_dir=args.working_dir,
                                        env_vars=env_vars, secrets=secrets)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    masker = SecretMasker(secrets.values())

    from ray.job_submission import JobSubmissionClient

    if not args.mlflow_uri:
        print("note: no MLFLOW_TRACKING_URI (--mlflow-uri): the job uses the config's tracking.tracking_uri")
    shown = {k: redact(k, v) for k, v in runtime_env["env_vars"].items() if k not in secrets}
    print(f"working_dir: {runtime_env.get('working_dir')}")
    print(f"env_vars: {json.dumps(shown, sort_keys=True)}")
    print(f"secrets passed from your environment (values not shown): {', '.join(secrets) or 'none'}")
    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(
        entrypoint=shlex.join(entrypoint),
        runtime_env=runtime_env,
        submission_id=args.submission_id,
        entrypoint_num_cpus=args.entrypoint_num_cpus,
        entrypoint_num_gpus=args.entrypoint_num_gpus,
        entrypoint_memory=args.entrypoint_memory,
        entrypoint_resources=args.entrypoint_resources,
    )
    print(f"submitted job {job_id}: {masker.mask(shlex.join(entrypoint))}", flush=True)
    print(f"  log:    ray job logs --address {args.address} --follow {job_id}")
    print(f"  status: ray job status --address {args.address} {job_id}", flush=True)
    if args.no_wait:
        return 0
    try:
        asyncio.run(_follow(client, job_id, masker))
        info = _wait_terminal(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running "
              f"(stop it with: ray job stop --address {args.address} {job_id})")
        return _INTERRUPTED_STATUS
    status = exit_status(info.status.value, info.driver_exit_code)
    message = masker.mask(info.message or "")
    print(f"job {job_id} {info.status.value} (exit status {status}){': ' + message if message else ''}")
    return status


if __name__ == "__main__":
    sys.exit(main())
