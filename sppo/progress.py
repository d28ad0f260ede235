"""One-line progress reports for long stages: done/total, rate and ETA.

Plain log lines rather than a tqdm bar: a stage's workers write to the Ray job log, where a
bar's carriage-return redraws arrive as one unreadable line. `LoggedProgress` turns a library's
tqdm bar (vLLM's `use_tqdm` takes the class) into such lines.
"""

from __future__ import annotations

import io
import logging

from tqdm import tqdm

# Long stages report at most this often (and when done), so a job log stays readable.
PROGRESS_EVERY_S = 10.0


def progress(done: int, total: int, elapsed_s: float, unit: str) -> str:
    """e.g. '120/480 pairs (40.0 pairs/s, ETA 9s)'."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
    return f"{done}/{total} {unit} ({rate:.1f} {unit}/s, ETA {eta})"


class LoggedProgress(tqdm):
    """tqdm's counting and timing, reported on the `sppo.progress` logger at most every
    `interval_s` while unfinished; completion is the caller's to report."""

    interval_s = PROGRESS_EVERY_S
    unit_name = "prompts"

    def __init__(self, *args, **kwargs):
        kwargs.update(file=io.StringIO(), mininterval=self.interval_s, miniters=1, dynamic_ncols=False)
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None) -> bool:
        if self.total and 0 < self.n < self.total:
            logging.getLogger("sppo.progress").info(
                "%s: %s", self.desc or "progress", progress(self.n, self.total, self.format_dict["elapsed"],
                                                            self.unit_name))
        return True
