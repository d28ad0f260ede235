"""One-line progress reports for long stages: done/total, rate and ETA.

Plain log lines rather than a tqdm bar: a stage's workers write to the Ray job log, where a
bar's carriage-return redraws arrive as one unreadable line.
"""

from __future__ import annotations


def progress(done: int, total: int, elapsed_s: float, unit: str) -> str:
    """e.g. '120/480 pairs (40.0 pairs/s, ETA 9s)'."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    eta = f"{(total - done) / rate:.0f}s" if rate > 0 else "?"
    return f"{done}/{total} {unit} ({rate:.1f} {unit}/s, ETA {eta})"
