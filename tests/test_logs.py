"""sppo.logs in a real Ray worker: third-party output goes to its own file beside Ray's worker
logs, while our `sppo` lines and errors stay in the stream Ray forwards to the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sppo.logs import job_runtime_env, route_third_party_output

REPO = Path(__file__).resolve().parents[1]


DRIVER = """
import json, logging, os, sys, warnings
from pathlib import Path
import ray
from sppo.logs import job_runtime_env

def noisy():
    print("noise on stdout from a library")
    print("noise on stderr from a library", file=sys.stderr)
    warnings.warn("a library's FutureWarning", FutureWarning)
    logging.getLogger("vllm.fake").warning("a library's warning")
    logging.getLogger("sppo.sampling").info("our own progress line")
    logging.getLogger("deepspeed.fake").error("a library's error")
    sys.stdout.flush()
    sys.stderr.flush()
    third_party = os.readlink("/proc/self/fd/1")
    [ray_err] = Path(third_party).parent.glob(f"worker-*-{os.getpid()}.err")
    return third_party, str(ray_err)

# The job-level runtime env, as sppo.run sets it: Ray runs the hook in every worker process.
ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env=job_runtime_env())
print(json.dumps(ray.get(ray.remote(num_cpus=0)(noisy).remote(), timeout=120)))
"""


@pytest.mark.slow
def test_a_worker_keeps_our_lines_and_errors_and_files_the_rest(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SPPO_VERBOSE"}
    done = subprocess.run([sys.executable, "-c", DRIVER], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    third_party, ray_err = (Path(p) for p in json.loads(done.stdout.splitlines()[-1]))
    assert third_party.name.startswith("sppo-third-party-") and third_party.parent == ray_err.parent
    filed, streamed = third_party.read_text(), ray_err.read_text()
    for line in ("noise on stdout", "noise on stderr", "FutureWarning", "a library's warning"):
        assert line in filed and line not in streamed, line
        assert line not in done.stdout + done.stderr, line  # nor in what the driver printed
    assert "INFO sppo.sampling: our own progress line" in streamed
    assert "a library's error" in streamed and "a library's error" in done.stderr  # errors are never hidden


def test_verbose_keeps_everything_in_the_job_log(monkeypatch):
    monkeypatch.setenv("SPPO_VERBOSE", "1")
    assert job_runtime_env() == {}
    monkeypatch.setenv("SPPO_VERBOSE", "0")
    assert job_runtime_env() == {"worker_process_setup_hook": "sppo.logs.route_third_party_output"}


def test_outside_a_ray_worker_nothing_changes():
    assert route_third_party_output() is None  # pytest's stderr is no Ray worker log
