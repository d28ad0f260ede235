"""A real S3 endpoint on loopback for the shared-storage tests: moto's S3 server (a separate
process speaking the S3 HTTP API), reached by pyarrow's own S3 client exactly as AWS would be."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

from sppo.devtools.localstack import free_port


@dataclass
class S3Server:
    endpoint: str
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        """What a client (the test, the job driver, every Ray worker) needs to reach it."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "sppo-test",
                "AWS_SECRET_ACCESS_KEY": "sppo-test-secret", "AWS_REGION": "us-east-1"}

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=30):
            pass
        return f"s3://{name}"


def start_s3_server(log_path: str) -> S3Server:
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(endpoint, timeout=5):
                return S3Server(endpoint, process)
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"moto S3 server did not start on port {port}; see {log_path}")
            time.sleep(0.5)
