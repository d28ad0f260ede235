"""Finding the processes a fault-injection test kills: Ray workers by their process title.

Ray titles a worker `ray::<Class>.<method>` while it runs that method (`ray::VLLMEngine.generate`,
`ray::RayTrainWorker.run_train_fn`), so a test can catch an actor in the middle of its work.
Only descendants of the given roots count, so Ray clusters of other tests are never touched.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil


def descendants_titled(roots: Iterable[int], fragment: str) -> list[psutil.Process]:
    found = []
    for root in roots:
        try:
            children = psutil.Process(root).children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for proc in children:
            try:
                if fragment in " ".join(proc.cmdline()):
                    found.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
    return found


def process_trees(pids: Iterable[int]) -> list[psutil.Process]:
    """The processes of `pids` that are alive, each with all its descendants."""
    found = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            found += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return found


def wait_for_titled(roots: Iterable[int], fragment: str, still_running: Callable[[], bool],
                    timeout_s: float = 900.0) -> psutil.Process:
    """The first descendant of `roots` titled with `fragment`; fails if the work under test
    ends first or the title does not show up within timeout_s."""
    roots = list(roots)
    deadline = time.monotonic() + timeout_s
    while not (found := descendants_titled(roots, fragment)):
        assert still_running(), f"the work under test ended before any '{fragment}' process ran"
        assert time.monotonic() < deadline, f"no '{fragment}' process within {timeout_s} s"
        time.sleep(0.05)
    return found[0]


def wait_gone(procs: Iterable[psutil.Process], timeout_s: float = 120.0) -> list[psutil.Process]:
    """Processes still alive (not zombies) after timeout_s."""
    _, alive = psutil.wait_procs(list(procs), timeout=timeout_s)
    return [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def driver_of(output_dir: Path) -> psutil.Process:
    """A job's driver: the `python -m sppo.run ... --output-dir <output_dir>` process."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if ("sppo.run" in cmd and str(output_dir) in cmd and "submit" not in cmd
                and Path(cmd[0]).name.startswith("python")):
            return proc
    raise AssertionError(f"no driver process for {output_dir}")
