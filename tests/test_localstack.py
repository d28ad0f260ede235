"""sppo.devtools.localstack on a machine that never ran Ray: the token `ray start` needs is created;
and which ports let MLflow start beside Ray."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from sppo.devtools.localstack import ensure_auth_token


def test_a_fresh_home_gets_an_owner_only_token_that_is_then_reused(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_TOKEN")}
    env["HOME"] = str(tmp_path)
    token = tmp_path / ".ray" / "auth_token"

    path, said = ensure_auth_token(env)
    assert path == token and str(token) in said and "created" in said
    assert token.read_text().strip()
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert stat.S_IMODE(token.parent.stat().st_mode) & 0o077 == 0
    # The token is not printed, only where it is.
    assert token.read_text().strip() not in said

    first = token.read_text()
    path, said = ensure_auth_token(env)
    assert path == token and "created" not in said and str(token) in said
    assert token.read_text() == first


def test_a_token_given_in_the_environment_is_used_as_is(tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_TOKEN": "from-the-environment"}
    assert ensure_auth_token(env) == (None, "Ray: token auth with the token in RAY_AUTH_TOKEN")
    assert not (tmp_path / ".ray").exists()

    given = tmp_path / "elsewhere" / "token"
    env = {**os.environ, "HOME": str(tmp_path), "RAY_AUTH_TOKEN_PATH": str(given)}
    env.pop("RAY_AUTH_TOKEN", None)
    with pytest.raises(RuntimeError, match=f"RAY_AUTH_TOKEN_PATH={given} names no token file"):
        ensure_auth_token(env)
    given.parent.mkdir()
    given.write_text("abc")
    path, said = ensure_auth_token(env)
    assert path == given and str(given) in said
    assert not (tmp_path / ".ray").exists()


def test_mlflow_starts_beside_ray_only_on_a_port_ray_never_picks_itself():
    """`ray start` binds its workers' ports and, for its other servers, ports from the OS's
    ephemeral range: an MLflow port there must be held before Ray starts; elsewhere (the demo's
    5000) both servers start at once."""
    from sppo.devtools.localstack import ephemeral_ports, free_port, free_port_ray_leaves_alone, ray_may_bind

    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert ephemeral_ports() == range(low, high + 1)
    assert not ray_may_bind(5000) and ray_may_bind(10002) and ray_may_bind(19999) and not ray_may_bind(20000)
    assert ray_may_bind(free_port())  # the OS hands out ephemeral ports
    port = free_port_ray_leaves_alone()
    assert not ray_may_bind(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free
