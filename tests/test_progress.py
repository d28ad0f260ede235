from sppo.progress import progress


def test_progress_line_has_done_total_rate_and_eta():
    assert progress(120, 480, 3.0, "pairs") == "120/480 pairs (40.0 pairs/s, ETA 9s)"
    assert progress(480, 480, 12.0, "pairs") == "480/480 pairs (40.0 pairs/s, ETA 0s)"


def test_progress_line_before_any_rate_is_known():
    assert progress(0, 10, 0.0, "steps") == "0/10 steps (0.0 steps/s, ETA ?)"
