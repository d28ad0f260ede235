"""Every Ray node's CPU, memory, disk, network and GPU use in the job's MLflow parent run.

The driver's own system metrics monitor sees only the machine it runs on (the Ray head, which has
no GPU in the shipped layouts), while the engines, judges and training workers run on the others.
One small actor per node (no CPU reserved, pinned to its node) runs MLflow's system metrics
monitor with MLflow's node naming: `system/<node>/cpu_utilization_percentage`, `.../gpu_0_...`
where the node has a GPU (nvidia-ml-py is in the GPU image), one sample every 10 s for the whole
job. Nodes that join after the job started are not watched.
"""

from __future__ import annotations


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


def start_node_monitors(run_id: str, tracking_uri: str) -> list:
    """One monitor actor on each live node, started without waiting for them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    monitor_cls = ray.remote(num_cpus=0, max_restarts=0)(NodeMetricsMonitor)
    return [monitor_cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
            .remote(run_id, tracking_uri, node_name(node))
            for node in ray.nodes() if node["Alive"]]


def stop_node_monitors(monitors: list, grace_s: float = 15.0) -> None:
    """Flush and stop each monitor (a node gone or a monitor stuck is not waited for past grace_s)."""
    import ray

    if monitors:
        ray.wait([m.stop.remote() for m in monitors], num_returns=len(monitors), timeout=grace_s)
    for monitor in monitors:
        ray.kill(monitor)
