"""Faults beyond one process, on real jobs: two jobs on one output directory (the MLflow server
going away: tests/test_mlflow_outage.py).

A real Ray head and MLflow server and the tiny config submitted with `ray job submit`.

- One output directory, one job: a first job holds its output directory's lease
  (`sppo/lease.py`) while it runs (held at its pair building, SPPO_HOLD_AT, so that it cannot
  finish before the test is done with it); a second submission with the same output directory is
  refused at once, naming the first job; the first job's driver is then SIGKILLed, and a third
  submission takes over its lease once it has gone unrenewed for `timeouts.lease_s`, and
  finishes the run.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from sppo.devtools.faults import HOLD_AT_ENV
from sppo.lease import LEASE_FILE
from tests.live_stack import REPO, nested_runs, submit, submit_command
from tests.processes import driver_of, wait_gone

pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.cluster_faults]

LEASE_S = 8
ARGS = ("--iters", "1", "--set", "prompts.per_iteration=16", "--set", "prompts.eval_size=0",
        "--set", f"timeouts.lease_s={LEASE_S}")


def test_one_output_directory_one_job_and_a_dead_drivers_lease_is_taken_over(live_stack, tmp_path):
    out = tmp_path / "run"
    cmd, env = submit_command(live_stack, out, *ARGS, job_env={HOLD_AT_ENV: "pairs"})
    first = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (out / LEASE_FILE).exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first job never took its lease"
            time.sleep(0.2)
        holder = json.loads((out / LEASE_FILE).read_text())["holder"]
        assert holder["submission_id"], holder  # a Ray job names itself by its submission id

        started = time.monotonic()
        second = subprocess.run(submit_command(live_stack, out, *ARGS)[0], env=env, cwd=REPO,
                                capture_output=True, text=True, timeout=300)
        refused_in = time.monotonic() - started
        assert second.returncode != 0
        assert f"error: output directory in use: {out / LEASE_FILE} is held by Ray job {holder['submission_id']}" \
            in second.stdout, second.stdout[-3000:]
        assert "=== iteration" not in second.stdout  # refused before any stage
        assert refused_in < 120, refused_in  # the submission's round trip and the checks, no compute
        print(f"second submission refused in {refused_in:.1f} s (job submission round trip included)")

        victim = driver_of(out)
        victim.kill()
        assert not wait_gone([victim], timeout_s=30)
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()

    started = time.monotonic()
    third = submit(live_stack, out, *ARGS)
    print(f"third submission took over and finished in {time.monotonic() - started:.1f} s")
    assert "taking over the lease" in third.stdout and f"Ray job {holder['submission_id']}" in third.stdout
    assert "SPPO finished" in third.stdout
    assert not (out / LEASE_FILE).exists()  # released at the end
    record = json.loads((out / "run.json").read_text())
    runs = nested_runs(live_stack, record["experiment_id"], record["parent_run_id"])
    assert list(runs) == ["iter-1"] and runs["iter-1"]["info"]["status"] == "FINISHED"
