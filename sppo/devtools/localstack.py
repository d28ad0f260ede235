"""A local Ray head and MLflow tracking server for the demo and the end-to-end tests.

`python -m sppo.devtools.localstack start` starts whichever of the two is not already answering,
binds both to 127.0.0.1, keeps Ray's token authentication on (creating the token on a
machine that has none), and records the PIDs of exactly the processes it started in
`<state_dir>/stack.json`; `stop` ends those and nothing else (never a blanket `ray stop`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

STATE_FILE = "stack.json"


def _answers(url: str, timeout: float = 2.0) -> bool:
    """True when an HTTP server answers at url (a 401 from Ray's token auth counts)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, http.client.HTTPException):  # nothing, or something that is not an HTTP server
        return False


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# `ray start` binds ports of its own choosing: its workers' (its default --min/--max-worker-port)
# and, for its other servers, port 0, which the OS serves from its ephemeral range.
RAY_WORKER_PORTS = range(10002, 20000)


def ephemeral_ports() -> range:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):  # not Linux: IANA's dynamic range
        low, high = 49152, 65535
    return range(low, high + 1)


def ray_may_bind(port: int) -> bool:
    """Could `ray start` take this port for one of its own servers?"""
    return port in RAY_WORKER_PORTS or port in ephemeral_ports()


def free_port_ray_leaves_alone() -> int:
    """A free loopback port that `ray start` never picks itself (for a server started beside it)."""
    for port in random.sample(range(RAY_WORKER_PORTS.stop, 32768), 200):
        if not ray_may_bind(port):
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port outside Ray's worker ports and the ephemeral range")


def _listening(port: int) -> bool:
    return any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
               for c in psutil.net_connections(kind="tcp"))


def _wait_until(predicate, what: str, timeout: float, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    hint = f"; see {log}" if log else ""
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s{hint}")


def _venv_env() -> dict[str, str]:
    """The environment for started servers: this interpreter's bin first on PATH, so that a
    job entrypoint's `python` is the project's, token auth explicitly on, and MLflow's usage
    telemetry off for the server and every job process (as Ray's usage stats are, with
    `--disable-usage-stats`) unless the caller's environment turns it on."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["RAY_AUTH_MODE"] = "token"
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def ensure_auth_token(env: dict[str, str]) -> tuple[Path | None, str]:
    """Make sure the Ray token that `env` points at exists, creating it (owner-only) when not.
    Returns its file (None when given as RAY_AUTH_TOKEN) and a line that says where it is.
    `ray start` with token auth refuses to start without one; only `ray.init()` creates it by
    itself, so a fresh home directory never has one.

    Ray reads RAY_AUTH_TOKEN, then the file RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token."""
    if env.get("RAY_AUTH_TOKEN"):
        return None, "Ray: token auth with the token in RAY_AUTH_TOKEN"
    if env.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(env["RAY_AUTH_TOKEN_PATH"]).expanduser()
        if not path.is_file() or not path.read_text().strip():
            raise RuntimeError(f"RAY_AUTH_TOKEN_PATH={path} names no token file; unset it to use "
                               f"~/.ray/auth_token, or create one there with `ray get-auth-token --generate`")
        return path, f"Ray: token auth with the token in {path} (RAY_AUTH_TOKEN_PATH)"
    path = Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return path, f"Ray: token auth with the token in {path}"
    # Ray's own generator, with a umask so that the file (and ~/.ray if new) is never readable
    # by others, not even between its creation and a chmod. Its stdout is the token: not shown.
    done = subprocess.run([str(Path(sys.executable).parent / "ray"), "get-auth-token", "--generate"],
                          env=env, capture_output=True, text=True, preexec_fn=lambda: os.umask(0o077))
    if done.returncode != 0 or not path.is_file():
        raise RuntimeError(f"could not create a Ray auth token at {path}: {done.stderr.strip()[-2000:]}")
    return path, f"Ray: created a token for token auth in {path} (readable by its owner only)"


@dataclass
class LocalStack:
    state_dir: Path
    ray_port: int = 6379
    dashboard_port: int = 8265
    mlflow_port: int = 5000
    # Logical CPUs, not cores: the tiny job's resident vLLM engine (1) holds its CPU while it
    # idles beside the two training workers (1 each), so 2 cores serve 3 reservations.
    num_cpus: int = 3
    pids: dict[str, list[int]] = field(default_factory=dict)
    # The token file the head was started with; a client elsewhere points RAY_AUTH_TOKEN_PATH at it.
    auth_token_path: Path | None = None

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def ray_temp_dir(self) -> Path:
        # Ray puts unix sockets under its temp dir and a socket path may not exceed 107 bytes,
        # so the temp dir is short and under /tmp rather than inside the (possibly deep) repo.
        tag = hashlib.sha1(str(self.state_dir.resolve()).encode()).hexdigest()[:8]
        return Path(f"/tmp/sppo-ray-{tag}-{self.ray_port}")

    def _worker_temp_dir(self, index: int) -> Path:
        # Not a prefix of the head's temp dir, so the head's PID marks never match this node.
        return Path(f"/tmp/sppo-rayw{index}-{self.ray_temp_dir.name.removeprefix('sppo-ray-')}")

    def _worker_indexes(self) -> list[int]:
        return [int(name.rsplit("-", 1)[1]) for name in self.pids if name.startswith("ray-worker-")]

    def temp_dirs(self) -> list[Path]:
        """Ray's temp dirs of the head and of every worker node added (sockets, session logs: under
        /tmp, outside state_dir), while they run."""
        return [self.ray_temp_dir, *(self._worker_temp_dir(i) for i in self._worker_indexes())]

    @contextlib.contextmanager
    def running(self):
        """This stack started; afterwards, pass or fail, stopped and its nodes' Ray temp dirs removed
        (for a stack of a test's or a benchmark's own)."""
        try:
            self.start()
            yield self
        finally:
            temp_dirs = self.temp_dirs()
            self.stop()
            for temp_dir in temp_dirs:
                shutil.rmtree(temp_dir, ignore_errors=True)

    def ray_running(self) -> bool:
        return _answers(f"{self.dashboard_url}/api/version")

    def mlflow_running(self) -> bool:
        return _answers(f"{self.mlflow_url}/health")

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.load()
        mlflow = None
        if self.mlflow_running():
            print(f"MLflow: already running at {self.mlflow_url}")
        else:
            mlflow = self._launch_mlflow()
        # Both start at once (each is mostly its imports), unless `ray start` could take MLflow's
        # port for itself before MLflow binds it: then Ray starts once MLflow holds it (a port in
        # use is never chosen).
        mlflow_first = mlflow is not None and ray_may_bind(self.mlflow_port)
        if mlflow_first:
            self._await_mlflow(mlflow)
        if self.ray_running():
            print(f"Ray: already running, dashboard {self.dashboard_url}")
        else:
            self._start_ray()
        if mlflow is not None and not mlflow_first:
            self._await_mlflow(mlflow)
        self._save()

    def _start_ray(self) -> None:
        ray_bin = Path(sys.executable).parent / "ray"
        log = self.state_dir / "ray-start.log"
        self.auth_token_path, said = ensure_auth_token(_venv_env())
        print(said)
        agent_port, client_port = free_port(), free_port()
        cmd = [
            str(ray_bin), "start", "--head", f"--num-cpus={self.num_cpus}", f"--port={self.ray_port}",
            "--node-ip-address=127.0.0.1", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={self.dashboard_port}", "--disable-usage-stats", f"--temp-dir={self.ray_temp_dir}",
            # The job agent's default port (52365) is shared by every Ray instance on the machine,
            # e.g. a test's own ray.init(); a free one lets both run side by side.
            f"--dashboard-agent-listen-port={agent_port}", f"--ray-client-server-port={client_port}",
        ]
        with open(log, "w") as fh:
            done = subprocess.run(cmd, env=_venv_env(), stdout=fh, stderr=subprocess.STDOUT)
        # Record the daemons even when `ray start` failed half-way, so `stop` can clean up.
        marks = (str(self.ray_temp_dir), f"127.0.0.1:{self.ray_port}")
        # Ray's client server names the head by the machine's address, not 127.0.0.1: its port tells it.
        client = f"--port={client_port}"
        self.pids["ray"] = [p.pid for p in psutil.process_iter(["cmdline"])
                            if any(m in " ".join(p.info["cmdline"] or []) for m in marks)
                            or client in (p.info["cmdline"] or [])]
        self._save()
        if done.returncode != 0:
            raise RuntimeError(f"`ray start` failed (exit {done.returncode}); see {log}")
        _wait_until(self.ray_running, "Ray dashboard", 120, log)
        # Jobs are accepted only once the node's job agent listens.
        _wait_until(lambda: _listening(agent_port), "Ray job agent", 120, log)
        print(f"Ray: started head (token auth on), dashboard {self.dashboard_url}")

    def add_worker_node(self, num_cpus: int, env: dict[str, str] | None = None) -> Path:
        """Start one more Ray node on this machine that joins the head (`ray start --address`),
        with its own temp dir, on loopback, token auth on, and `env` added to its processes'
        environment. Its daemons are recorded like the head's, so `stop` ends them too. Returns
        the node's temp dir."""
        index = 1 + len(self._worker_indexes())
        temp_dir = self._worker_temp_dir(index)
        log = self.state_dir / f"ray-worker-{index}.log"
        ensure_auth_token({**_venv_env(), **(env or {})})
        agent_port = free_port()
        cmd = [
            str(Path(sys.executable).parent / "ray"), "start", f"--address=127.0.0.1:{self.ray_port}",
            f"--num-cpus={num_cpus}", "--node-ip-address=127.0.0.1", "--disable-usage-stats",
            f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={agent_port}",
        ]
        with open(log, "w") as fh:
            done = subprocess.run(cmd, env={**_venv_env(), **(env or {})}, stdout=fh, stderr=subprocess.STDOUT)
        recorded = {pid for pids in self.pids.values() for pid in pids}
        self.pids[f"ray-worker-{index}"] = [p.pid for p in psutil.process_iter(["cmdline"])
                                            if str(temp_dir) in " ".join(p.info["cmdline"] or [])
                                            and p.pid not in recorded]
        self._save()
        if done.returncode != 0:
            raise RuntimeError(f"`ray start` of worker node {index} failed (exit {done.returncode}); see {log}")
        _wait_until(lambda: _listening(agent_port), f"Ray worker node {index}'s agent", 120, log)
        print(f"Ray: started worker node {index} ({num_cpus} CPUs) joined to 127.0.0.1:{self.ray_port}")
        return temp_dir

    def _launch_mlflow(self) -> subprocess.Popen:
        root = (self.state_dir / "mlflow").resolve()
        root.mkdir(parents=True, exist_ok=True)
        log = self.state_dir / "mlflow.log"
        env = _venv_env()
        # Without these the server forks a job runner and several workers (3+ GB RSS).
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        cmd = [
            str(Path(sys.executable).parent / "mlflow"), "server",
            f"--backend-store-uri=sqlite:///{root / 'mlflow.db'}",
            f"--artifacts-destination={root / 'artifacts'}", "--serve-artifacts",
            "--host=127.0.0.1", f"--port={self.mlflow_port}", "--workers=1",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.pids["mlflow"] = [proc.pid]
        self._save()
        return proc

    def _await_mlflow(self, proc: subprocess.Popen) -> None:
        log = self.state_dir / "mlflow.log"
        _wait_until(lambda: self.mlflow_running() or proc.poll() is not None, "MLflow server", 120, log)
        if proc.poll() is not None:
            raise RuntimeError(f"MLflow server exited with {proc.returncode}; see {log}")
        print(f"MLflow: started tracking server at {self.mlflow_url} (sqlite, artifacts under "
              f"{(self.state_dir / 'mlflow').resolve()})")

    def stop(self) -> None:
        """End exactly the processes `start` started (and their children)."""
        self.load()
        procs = []
        for pid in [p for pids in self.pids.values() for p in pids]:
            try:
                proc = psutil.Process(pid)
                procs += [proc, *proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        # Ray's GCS server (and one of its Python helpers) can sit out a SIGTERM: the rest exit
        # within a second or two, so a longer grace only delays the SIGKILL below.
        _, alive = psutil.wait_procs(procs, timeout=5)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=5)
        for name, pids in self.pids.items():
            if pids:
                print(f"{name}: stopped {len(pids)} process(es) started by sppo.devtools.localstack")
        self.pids = {}
        self._save()

    def _save(self) -> None:
        token = str(self.auth_token_path) if self.auth_token_path else None
        (self.state_dir / STATE_FILE).write_text(json.dumps({"pids": self.pids, "auth_token_path": token}, indent=2))

    def load(self) -> None:
        """Read the PIDs that an earlier `start` recorded, by this process or another (`make demo`)."""
        state = self.state_dir / STATE_FILE
        if state.exists():
            saved = json.loads(state.read_text())
            self.pids = saved["pids"]
            if saved.get("auth_token_path"):
                self.auth_token_path = Path(saved["auth_token_path"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sppo.devtools.localstack", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", default=".run", help="where PIDs, logs and the MLflow store live")
    parser.add_argument("--ray-port", type=int, default=6379)
    parser.add_argument("--dashboard-port", type=int, default=8265)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--num-cpus", type=int, default=LocalStack.num_cpus, help="logical CPUs of the head")
    args = parser.parse_args(argv)
    stack = LocalStack(Path(args.state_dir), args.ray_port, args.dashboard_port, args.mlflow_port, args.num_cpus)
    if args.action == "start":
        stack.start()
    elif args.action == "stop":
        stack.stop()
    else:
        print(f"Ray dashboard {stack.dashboard_url}: {'up' if stack.ray_running() else 'down'}")
        print(f"MLflow {stack.mlflow_url}: {'up' if stack.mlflow_running() else 'down'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
