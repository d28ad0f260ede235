"""A new user's Ray head, started the ordinary way on a 2-core machine (`ray start --head`: 2
CPUs), and the tiny default submitted to it: the kept vLLM engine (1 CPU) would leave training's
2 workers of 1 CPU each waiting for ever. The job sees it before the first stage, restarts its
engines per sampling call instead, says so in one line, records the mode it used in MLflow, and
completes 2 iterations, learning as it does on the demo's 3-CPU head (2, not the demo's 3:
the third shows nothing new and took about 2 minutes of the suite)."""

from __future__ import annotations

import json
import re

import pytest

from sppo.devtools.localstack import LocalStack, free_port
from tests.live_stack import nested_runs, rest, submit

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture
def two_cpu_stack(tmp_path_factory):
    stack = LocalStack(tmp_path_factory.mktemp("two-cpu"), ray_port=free_port(), dashboard_port=free_port(),
                       mlflow_port=free_port(), num_cpus=2)
    with stack.running():
        yield stack


def test_the_tiny_default_on_a_two_cpu_head_falls_back_to_restarted_engines(two_cpu_stack, tmp_path):
    out = tmp_path / "out"
    done = submit(two_cpu_stack, out, "--iters", "2")
    log = done.stdout
    [note] = [line for line in log.splitlines() if "placement: " in line]
    assert "the kept vLLM engines hold 1 CPU, 0 GPU" in note and "stage 'training' needs 2 x 1 CPU" in note
    assert "the cluster has 2 CPU, 0 GPU over 1 node(s)" in note and "restart for each sampling call" in note
    assert not re.search(r"waiting \d+ s for Ray to place", log)  # nothing left pending, so nothing said
    record = json.loads((out / "run.json").read_text())
    runs = nested_runs(two_cpu_stack, record["experiment_id"], record["parent_run_id"])
    assert sorted(runs) == ["iter-1", "iter-2"]
    for run in runs.values():
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert (params["sampling.engine_mode"], params["sampling.engine_mode_used"]) == ("auto", "restart")
    history = rest(two_cpu_stack, "metrics/get-history", {"run_id": record["parent_run_id"],
                                                          "metric_key": "eval/win_rate_vs_base"})["metrics"]
    by_iteration = {m["step"]: m["value"] for m in history}
    assert by_iteration[1] < by_iteration[2], by_iteration
