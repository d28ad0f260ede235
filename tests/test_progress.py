import logging

from sppo.progress import LoggedProgress, progress


def test_progress_line_has_done_total_rate_and_eta():
    assert progress(120, 480, 3.0, "pairs") == "120/480 pairs (40.0 pairs/s, ETA 9s)"
    assert progress(480, 480, 12.0, "pairs") == "480/480 pairs (40.0 pairs/s, ETA 0s)"


def test_progress_line_before_any_rate_is_known():
    assert progress(0, 10, 0.0, "steps") == "0/10 steps (0.0 steps/s, ETA ?)"


def test_a_library_progress_bar_becomes_log_lines_while_unfinished(caplog, monkeypatch):
    monkeypatch.setattr(LoggedProgress, "interval_s", 0.0)
    with caplog.at_level(logging.INFO, logger="sppo.progress"):
        bar = LoggedProgress(total=4, desc="Processed prompts")
        for _ in range(4):
            bar.update(1)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    # Unfinished states only: completion is reported by the caller.
    assert [line.split(" (")[0] for line in lines] == [f"Processed prompts: {n}/4 prompts" for n in (1, 2, 3)]
    assert all("prompts/s, ETA" in line for line in lines)
