"""Every node's system metrics, nodes that join while the job runs included."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A cluster of this process's own (a head of 1 CPU), so that adding a node is one call; MLflow in
# a sqlite file. Prints the node ids with a monitor and the node that joined.
JOINING_NODE = """
import sys, time
import mlflow, ray
from ray.cluster_utils import Cluster
from sppo.node_metrics import NodeMonitors

uri = sys.argv[1]
run_id = mlflow.MlflowClient(uri).create_run(mlflow.MlflowClient(uri).create_experiment("nodes")).info.run_id
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
ray.init(address=cluster.address)
monitors = NodeMonitors(run_id, uri, check_s=1)
first = set(monitors.monitors)
joined = cluster.add_node(num_cpus=1).node_id
deadline = time.monotonic() + 60
while joined not in monitors.monitors and time.monotonic() < deadline:
    time.sleep(0.5)
placed = {}
if joined in monitors.monitors:
    placed = ray.get(monitors.monitors[joined].__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()),
                     timeout=60)
monitors.stop()
print("first", sorted(first))
print("joined", joined, "placed", placed)
ray.shutdown()
cluster.shutdown()
"""


def test_a_node_that_joins_while_the_job_runs_gets_its_monitor(tmp_path):
    """An autoscaler adds the GPU nodes for training after the job started: their metrics (the
    ones that matter most) used to be missing from the parent run."""
    script = tmp_path / "joining_node.py"
    script.write_text(JOINING_NODE)
    done = subprocess.run([sys.executable, str(script), f"sqlite:///{tmp_path / 'mlflow.db'}"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if line.startswith(("first", "joined")))
    joined, placed = lines["joined"].split(" placed ")
    assert joined not in lines["first"], "the joining node was there from the start"
    assert placed == joined, f"no monitor on the node that joined: {lines}"
