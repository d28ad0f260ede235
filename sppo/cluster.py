"""Ray nodes that leave the cluster while a stage waits on work placed there.

When a node dies, Ray restarts its actors on other nodes and Ray Train restarts its worker
group, if the nodes that are left have room. When they do not, the restarted work waits for
resources that will not come back, up to the stage's timeout (hours by default). `NodeWatch`
ends that wait `timeouts.node_lost_s` after the loss with an error that names the node and says
how to continue: everything published before the fault is kept, so re-submitting continues.
"""

from __future__ import annotations

import time

# How often a waiting stage asks Ray whether its nodes are still there.
POLL_S = 2.0


class NodeLostError(RuntimeError):
    """A node the stage started with left, and the stage did not finish without it in time."""


class NodeWatch:
    """The nodes alive when a stage began; `check()` raises NodeLostError once one of them has
    been gone for `grace_s` (the time Ray gets to carry on without it)."""

    def __init__(self, stage: str, grace_s: float):
        import ray

        self.stage, self.grace_s = stage, grace_s
        self._nodes = {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}
        self._lost_since: dict[str, float] = {}

    def lost(self) -> dict | None:
        """A node the stage began with that is gone now (Ray's record of it), or None."""
        import ray

        return next((node for node in ray.nodes() if node["NodeID"] in self._nodes and not node["Alive"]), None)

    def check(self) -> None:
        """Raise NodeLostError once a node the stage began with has been gone for grace_s."""
        now = time.monotonic()
        if (node := self.lost()) is not None:
            since = self._lost_since.setdefault(node["NodeID"], now)
            if now - since >= self.grace_s:
                raise self.error(node, f"the stage could not finish on the nodes that are left within "
                                       f"timeouts.node_lost_s={self.grace_s:g} s")

    def explain(self, err: BaseException, wait_s: float = 30.0) -> None:
        """The stage failed with `err`: if a node it began with is gone, or is found gone within
        wait_s (Ray notices a dead node some seconds after its work fails), raise NodeLostError
        naming it instead."""
        deadline = time.monotonic() + wait_s
        while (node := self.lost()) is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if node is not None:
            raise self.error(node, f"what ran on it failed ({type(err).__name__})") from err

    def error(self, node: dict, what: str) -> NodeLostError:
        return NodeLostError(
            f"stage '{self.stage}': Ray node {node['NodeID']} ({node['NodeManagerAddress']}) left the cluster, "
            f"and {what}. Everything published so far is kept; once the cluster has that capacity again, "
            "submit the same command again to continue"
        )
