"""A loopback stand-in for the Hugging Face hub's model access check (`/api/models/<id>/auth-check`)
that answers as the hub does, so preflight's hub paths meet huggingface_hub's own errors without
a network: org/found 200, org/gated 403 GatedRepo, org/broken 500, any other id 404 RepoNotFound."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ANSWERS = {"org/found": (200, None), "org/gated": (403, "GatedRepo"), "org/broken": (500, None)}


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.server.paths.append(self.path)
        repo = self.path.removeprefix("/api/models/").removesuffix("/auth-check")
        status, code = ANSWERS.get(repo, (404, "RepoNotFound"))
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@contextmanager
def fake_hub(monkeypatch, home: Path, token: str | None = None) -> Iterator[list[str]]:
    """The hub at a loopback address for this process, online, with `token` as its only token and
    `home` for what huggingface_hub keeps (its agent registry cache); yields the paths it was asked for."""
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.paths = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "no-token"))
    monkeypatch.setattr(constants, "AGENT_HARNESSES_PATH", str(home / "agent_harnesses.json"))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    if token is not None:
        monkeypatch.setenv("HF_TOKEN", token)
    try:
        yield server.paths
    finally:
        server.shutdown()
        server.server_close()
