"""Named points where the crash-safety tests SIGKILL the job's driver.

The pair-building and tracking stages take milliseconds to seconds, too short for a test to
kill the driver inside them from outside; setting SPPO_KILL_AT=<point> in the job's environment
makes the driver SIGKILL itself there instead. SPPO_HOLD_AT=<point> makes it wait there, its
lease still renewed, until a test kills it from outside: a job that must still be running when
the test acts (tests/test_cluster_faults.py) cannot then finish first on a slow machine. Unset,
as in every real run, a point does nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

KILL_AT_ENV = "SPPO_KILL_AT"
HOLD_AT_ENV = "SPPO_HOLD_AT"

log = logging.getLogger("sppo")


def kill_point(name: str) -> None:
    """SIGKILL this process if SPPO_KILL_AT names this point; wait here for ever if SPPO_HOLD_AT does."""
    if os.environ.get(KILL_AT_ENV) == name:
        log.warning("%s=%s: the driver kills itself here (fault injection)", KILL_AT_ENV, name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(HOLD_AT_ENV) == name:
        log.warning("%s=%s: the driver waits here until it is killed (fault injection)", HOLD_AT_ENV, name)
        threading.Event().wait()
