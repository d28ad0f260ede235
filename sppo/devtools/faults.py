"""Named points where the crash-safety tests SIGKILL the job's driver.

The pair-building and tracking stages take milliseconds to seconds, too short for a test to
kill the driver inside them from outside; setting SPPO_KILL_AT=<point> in the job's environment
makes the driver SIGKILL itself there instead. Unset, as in every real run, a point does nothing.
"""

from __future__ import annotations

import logging
import os
import signal

KILL_AT_ENV = "SPPO_KILL_AT"

log = logging.getLogger("sppo")


def kill_point(name: str) -> None:
    """SIGKILL this process if SPPO_KILL_AT names this point."""
    if os.environ.get(KILL_AT_ENV) == name:
        log.warning("%s=%s: the driver kills itself here (fault injection)", KILL_AT_ENV, name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
