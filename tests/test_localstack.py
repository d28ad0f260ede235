"""sppo.devtools.localstack on a machine that never ran Ray: the token `ray start` needs is created."""

from __future__ import annotations

import os
import stat

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
