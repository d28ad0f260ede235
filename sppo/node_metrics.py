"""Every Ray node's CPU, memory, disk, network and GPU use in the job's MLflow parent run.

The driver's own system metrics monitor sees only the machine it runs on (the Ray head, which has
no GPU in the shipped layouts), while the engines, judges and training workers run on the others.
One small actor per node (no CPU reserved, pinned to its node) runs MLflow's system metrics
monitor with MLflow's node naming: `system/<node>/cpu_utilization_percentage`, `.../gpu_0_...`
where the node has a GPU (nvidia-ml-py is in the GPU image), one sample every 10 s for the whole
job. Nodes that join while the job runs (an autoscaler adding GPU nodes for training) get theirs
at the next check, every NodeMonitors.check_s: Ray's public API announces no joining node.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("sppo")


class NodeMetricsMonitor:
    """A Ray actor: MLflow's system metrics monitor for the node it runs on, logging to run_id."""

    def __init__(self, run_id: str, tracking_uri: str, node: str):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(run_id, node_id=node, tracking_uri=tracking_uri)
        self._monitor.start()

    def stop(self) -> None:
        self._monitor.finish()  # the last sample is flushed


def node_name(node: dict) -> str:
    """A node as its metrics name it: its address and the start of its Ray id (two nodes may share
    an address)."""
    return f"{node['NodeManagerAddress']}-{node['NodeID'][:8]}"


class NodeMonitors:
    """A NodeMetricsMonitor on every live node for as long as this lives: those of the nodes up now,
    started without waiting for them, then one for each node that joins, checked every check_s."""

    def __init__(self, run_id: str, tracking_uri: str, check_s: float = 30.0):
        import ray

        self._run_id, self._tracking_uri, self._check_s = run_id, tracking_uri, check_s
        self._monitor_cls = ray.remote(num_cpus=0, max_restarts=0)(NodeMetricsMonitor)
        self.monitors: dict[str, object] = {}  # node id -> its monitor actor
        self._stopped = threading.Event()
        self.watch_new_nodes()
        self._thread = threading.Thread(target=self._keep_watching, name="node-monitors", daemon=True)
        self._thread.start()

    def watch_new_nodes(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        for node in ray.nodes():
            if node["Alive"] and node["NodeID"] not in self.monitors:
                self.monitors[node["NodeID"]] = self._monitor_cls.options(
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                ).remote(self._run_id, self._tracking_uri, node_name(node))

    def _keep_watching(self) -> None:
        while not self._stopped.wait(self._check_s):
            try:
                self.watch_new_nodes()
            except Exception as err:  # metrics are never worth a job: try again at the next check
                log.warning("system metrics: could not check for new Ray nodes: %s", err)

    def stop(self, grace_s: float = 15.0) -> None:
        """Flush and stop each monitor (a node gone or a monitor stuck is not waited for past grace_s)."""
        import ray

        self._stopped.set()
        self._thread.join()
        monitors = list(self.monitors.values())
        if monitors:
            ray.wait([m.stop.remote() for m in monitors], num_returns=len(monitors), timeout=grace_s)
        for monitor in monitors:
            ray.kill(monitor)
