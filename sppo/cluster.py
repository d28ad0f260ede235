"""Waiting on a stage's actors: one deadline for all of them, the nodes they run on watched,
their placement reported while Ray has not placed them (`PlacementWait`), and the culprit named
when something does not come back (`wait_for_all`, used by sampling, judging and, through them,
evaluation; training watches its placement group and nodes the same way).

When a node dies, Ray restarts its actors on other nodes and Ray Train restarts its worker
group, if the nodes that are left have room. When they do not, the restarted work waits for
resources that will not come back, up to the stage's timeout (hours by default). `NodeWatch`
ends that wait `timeouts.node_lost_s` after the loss with an error that names the node and says
how to continue: everything published before the fault is kept, so re-submitting continues.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any

log = logging.getLogger("sppo")

# How often a waiting stage asks Ray whether its nodes are still there.
POLL_S = 2.0
# How often a stage whose actors Ray has not placed says what it waits for.
PLACEMENT_REPORT_S = 30.0


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


def free_resources() -> str:
    """What the cluster has free now, e.g. '0 of 2 CPU, 0 of 0 GPU free'."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    return ", ".join(f"{free.get(name, 0.0):g} of {total.get(name, 0.0):g} {name}" for name in ("CPU", "GPU")) + " free"


class PlacementWait:
    """Actors of a stage that Ray has not placed yet (`pending()`: one description per kind of
    actor still waiting, empty once all are placed). `check()` logs what is pending every
    PLACEMENT_REPORT_S of an unbroken wait, and raises TimeoutError once it has lasted timeout_s
    (timeouts.placement_s)."""

    def __init__(self, stage: str, pending: Callable[[], list[str]], timeout_s: float | None = None):
        self.stage, self.pending, self.timeout_s = stage, pending, timeout_s
        self._since: float | None = None
        self._reported = 0.0

    def check(self) -> None:
        waiting, now = self.pending(), time.monotonic()
        if not waiting:
            self._since = None
            return
        if self._since is None:
            self._since = self._reported = now
        waited = now - self._since
        if self.timeout_s is not None and waited >= self.timeout_s:
            raise TimeoutError(f"stage '{self.stage}': Ray did not place {', '.join(waiting)} within "
                               f"timeouts.placement_s={self.timeout_s:g} s ({free_resources()}); free those "
                               "resources or lower the stage's demand, then submit the same command again")
        if now - self._reported >= PLACEMENT_REPORT_S:
            self._reported = now
            log.warning("stage '%s': waiting %.0f s for Ray to place %s (%s; it fails after "
                        "timeouts.placement_s=%g s)", self.stage, waited, ", ".join(waiting), free_resources(),
                        self.timeout_s if self.timeout_s is not None else math.inf)


def wait_for_all(pending: Mapping[Any, Hashable], *, stage: str, describe: Callable[[Hashable], str],
                 timeout_s: float | None = None, started: float | None = None, watch: NodeWatch | None = None,
                 on_done: Callable[[Hashable, Any], None] | None = None,
                 placement: PlacementWait | None = None) -> dict[Hashable, Any]:
    """The results of a stage's actor calls (`pending`: object ref -> its key), by key.

    Waits at most timeout_s from `started` (time.monotonic(); default now) and checks the
    stage's nodes (`watch`) and its actors' placement (`placement`) meanwhile. On a timeout, a
    TimeoutError names every call still pending by `describe(key)`; on a failed call, a
    RuntimeError names that one (a NodeLostError where a node it began with is gone).
    on_done(key, result) as each arrives.
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
            if placement is not None:
                placement.check()
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
