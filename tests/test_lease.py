"""sppo.lease: one job per output directory, a dead holder's lease taken over."""

from __future__ import annotations

import json
import logging
import time

import pytest

from sppo.lease import LEASE_FILE, Holder, LeaseError, OutputLease, lease_state


def test_lease_state_by_age():
    assert lease_state(None, 100.0, 60.0) == "free"
    assert lease_state({"renewed_at": 50.0}, 100.0, 60.0) == "live"
    assert lease_state({"renewed_at": 30.0}, 100.0, 60.0) == "expired"


def test_a_second_driver_is_refused_while_the_first_holds_the_lease(tmp_path):
    first = OutputLease.for_run(tmp_path / "run", None, ttl_s=0.8)
    second = OutputLease.for_run(tmp_path / "run", None, ttl_s=0.8)
    with first:
        time.sleep(2.0)  # longer than the TTL: only renewals keep it live
        with pytest.raises(LeaseError) as refused:
            second.acquire()
        message = str(refused.value)
        assert f"{tmp_path / 'run' / LEASE_FILE} is held by host" in message and f"PID {first.holder.pid}" in message
        assert "--force does not override it" in message
    assert not (tmp_path / "run" / LEASE_FILE).exists()  # released
    with second:
        assert json.loads((tmp_path / "run" / LEASE_FILE).read_text())["holder"]["token"] == second.holder.token


def test_a_dead_holders_lease_is_taken_over_with_a_log_line(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    dead = Holder("gone-host", 4242, "raysubmit_dead", "0" * 16)
    (run / LEASE_FILE).write_text(json.dumps({"holder": dead.__dict__, "renewed_at": time.time() - 120}))
    with caplog.at_level(logging.WARNING, logger="sppo.lease"), OutputLease.for_run(run, None, ttl_s=60) as lease:
        held = json.loads((run / LEASE_FILE).read_text())
        assert held["holder"]["token"] == lease.holder.token
    assert "taking over the lease" in caplog.text and "Ray job raysubmit_dead, host gone-host, PID 4242" in caplog.text


def test_a_torn_lease_file_holds_nothing(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / LEASE_FILE).write_text('{"holder": ')
    with OutputLease.for_run(run, None, ttl_s=60):
        pass


def test_the_lease_lives_in_shared_storage_when_set(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/leased-run"
    first = OutputLease.for_run(tmp_path / "a", uri, ttl_s=30)
    with first:
        with pytest.raises(LeaseError, match=f"{uri}/{LEASE_FILE} is held by"):
            OutputLease.for_run(tmp_path / "b", uri, ttl_s=30).acquire()  # another machine's output_dir
    assert not (tmp_path / "a" / LEASE_FILE).exists()
