"""What reaches the job's log: our own lines and errors; third-party output goes to files.

vLLM, DeepSpeed, transformers and torch write hundreds of lines a job (weight loading, kernel
choices, deprecation warnings, progress bars) from the engine, judge and training processes,
and Ray streams every line those processes write into the job's log. So every worker process
of the job starts with `route_third_party_output` (Ray's `worker_process_setup_hook`, set on
the job by `job_runtime_env`): whatever the process writes to stdout or stderr goes to
`sppo-third-party-<pid>.log` beside Ray's own log files of that worker (kept with them, shown
in the Ray dashboard's logs view, not streamed), while our `sppo` loggers and any ERROR record
still reach the job's log. Errors that stop a stage reach the driver as Ray exceptions anyway.

`--verbose` or SPPO_VERBOSE=1 keeps everything in the job's log.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

VERBOSE_ENV = "SPPO_VERBOSE"
THIRD_PARTY_LOG = "sppo-third-party-{pid}.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def job_runtime_env(env_vars: dict[str, str] | None = None) -> dict:
    """The runtime env the driver adds to the job (`ray.init`): Ray merges it with the
    submission's (whose variables must not be given again) and every task and actor of the job
    inherits it."""
    runtime_env = {"env_vars": dict(env_vars)} if env_vars else {}
    if not verbose():
        runtime_env["worker_process_setup_hook"] = "sppo.logs.route_third_party_output"
    return runtime_env


def quiet_driver() -> None:
    """In the job's driver, unless verbose: MLflow's own INFO lines (system-metrics monitor,
    registry waits), its run links (the job prints its own) and transformers' progress bars stay
    out of the job's log."""
    if verbose():
        return
    from transformers.utils import logging as transformers_logging

    # MLflow sets its loggers' level from the environment when it is imported.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # in case it was imported already
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    transformers_logging.disable_progress_bar()


def route_third_party_output() -> Path | None:
    """In a Ray worker process: send stdout and stderr to the third-party log beside the
    worker's own (Ray's `worker-*.err`, where it finds them), keeping a handle on the job's
    stream for the `sppo` loggers and ERROR records. Returns the file, or None outside a Ray
    worker (nothing changed)."""
    try:
        ray_err = Path(os.readlink("/proc/self/fd/2"))
    except OSError:
        return None
    if not (ray_err.name.startswith("worker-") and ray_err.suffix == ".err"):
        return None
    job_stream = os.fdopen(os.dup(2), "w", buffering=1)
    ours = logging.StreamHandler(job_stream)
    ours.setFormatter(logging.Formatter(LOG_FORMAT))
    sppo_logger = logging.getLogger("sppo")
    sppo_logger.addHandler(ours)
    sppo_logger.setLevel(logging.INFO)
    sppo_logger.propagate = False
    path = ray_err.parent / THIRD_PARTY_LOG.format(pid=os.getpid())
    with open(path, "a") as target:
        os.dup2(target.fileno(), 1)
        os.dup2(target.fileno(), 2)
    # Records that reach the root logger: all into the file (stderr is the file now), errors
    # into the job's stream too.
    for stream, level in ((sys.stderr, logging.NOTSET), (job_stream, logging.ERROR)):
        handler = logging.StreamHandler(stream)
        handler.setLevel(level)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logging.getLogger().addHandler(handler)
    return path
