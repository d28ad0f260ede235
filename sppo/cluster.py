"""Waiting on a stage's actors: one deadline for all of them, the nodes they run on watched,
and the culprit named when something does not come back (`wait_for_all`, used by sampling,
judging and, through them, evaluation).

When a node dies, Ray restarts its actors on other nodes and Ray Train restarts its worker
group, if the nodes that are left have room. When they do not, the restarted work waits for
resources that will not come back, up to the stage's timeout (hours by default). `NodeWatch`
ends that wait `timeouts.node_lost_s` after the loss with an error that names the node and says
how to continue: everything published before the fault is kept, so re-submitting continues.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

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


def wait_for_all(pending: Mapping[Any, Hashable], *, stage: str, describe: Callable[[Hashable], str],
                 timeout_s: float | None = None, started: float | None = None, watch: NodeWatch | None = None,
                 on_done: Callable[[Hashable, Any], None] | None = None) -> dict[Hashable, Any]:
    """The results of a stage's actor calls (`pending`: object ref -> its key), by key.

    Waits at most timeout_s from `started` (time.monotonic(); default now) and checks the
    stage's nodes meanwhile (`watch`). On a timeout, a TimeoutError names every call still
    pending by `describe(key)`; on a failed call, a RuntimeError names that one (a
    NodeLostError where a node it began with is gone). on_done(key, result) as each arrives.
    """
    import ray

    started = time.monotonic() if started is None else started
    pending, results = dict(pending), {}
    while pending:
        left = math.inf if timeout_s is None else timeout_s - (time.monotonic() - started)
        if left <= 0:
            late = "; ".join(describe(key) for key in pending.values())
            raise TimeoutError(f"stage '{stage}': {late}: not done within timeout_s={timeout_s:g} s")
        done, _ = ray.wait(list(pending), num_returns=1, timeout=min(left, POLL_S))
        if not done:
            if watch is not None:
                watch.check()
            continue
        key = pending.pop(done[0])
        try:
            results[key] = ray.get(done[0])
        except ray.exceptions.RayError as err:
            if watch is not None:
                watch.explain(err)
            raise RuntimeError(f"stage '{stage}': {describe(key)} failed: {err}") from err
        if on_done is not None:
            on_done(key, results[key])
    return results
