"""One output directory, one job: a lease that the job's driver holds on its run.

Two drivers on one run would both sample, judge and publish the same iteration, and replace
each other's MLflow runs. So before any work the driver writes `.sppo-lease.json` where the
run lives (`storage_uri` when set, else output_dir), naming itself (the Ray submission id where
there is one, host and PID), and renews it every `ttl_s / 4` from a background thread. A second
driver finds a live lease and is refused at once, naming the holder and the file; a lease not
renewed for `ttl_s` belongs to a driver that died (SIGKILL, a lost node) and is taken over, with
a log line. `--force` does not override a live lease.

Writing then reading back decides a race: two drivers that find no lease in the same moment
both write theirs, and the one that reads back the other's after `settle_s` gives way.
Pure core: `Holder`, `lease_state`. Shell: `OutputLease`, on any pyarrow filesystem.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.fs as pafs

LEASE_FILE = ".sppo-lease.json"
log = logging.getLogger("sppo.lease")


class LeaseError(RuntimeError):
    """The run is held by another live job."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    submission_id: str | None
    token: str  # tells this driver's lease from an earlier driver's with the same host and PID

    @classmethod
    def this_process(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), ray_submission_id(), os.urandom(8).hex())

    def describe(self) -> str:
        job = f"Ray job {self.submission_id}, " if self.submission_id else ""
        return f"{job}host {self.host}, PID {self.pid}"


def ray_submission_id() -> str | None:
    """The submission id of the Ray job this driver runs in (`ray job submit`), if any."""
    config = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not config:
        return None
    try:
        return json.loads(config).get("metadata", {}).get("job_submission_id")
    except ValueError:
        return None


def lease_state(record: dict | None, now: float, ttl_s: float) -> str:
    """'free' (no lease), 'expired' (not renewed for ttl_s) or 'live'."""
    if record is None:
        return "free"
    return "expired" if now - float(record.get("renewed_at", 0.0)) > ttl_s else "live"


class OutputLease:
    """The lease on the run at `base` of filesystem `fs`; `where` names it in messages."""

    def __init__(self, fs: pafs.FileSystem, base: str, where: str, ttl_s: float = 60.0, settle_s: float = 1.0):
        self.fs, self.path, self.where = fs, f"{base.rstrip('/')}/{LEASE_FILE}", where
        self.ttl_s, self.settle_s = ttl_s, settle_s
        self.holder = Holder.this_process()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @classmethod
    def for_run(cls, output_dir: Path, storage_uri: str | None, ttl_s: float) -> OutputLease:
        """The lease where the run lives: storage_uri when set, else output_dir."""
        if storage_uri:
            fs, base = pafs.FileSystem.from_uri(storage_uri.rstrip("/"))
            return cls(fs, base, f"{storage_uri.rstrip('/')}/{LEASE_FILE}", ttl_s)
        path = Path(output_dir).resolve()
        return cls(pafs.LocalFileSystem(), str(path), str(path / LEASE_FILE), ttl_s)

    def __enter__(self) -> OutputLease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lease, or raise LeaseError naming the live holder; start renewing it."""
        record = self._read()
        state = lease_state(record, time.time(), self.ttl_s)
        if state == "live":
            raise LeaseError(self._held_by(record))
        if state == "expired":
            log.warning("taking over the lease %s of %s, not renewed for %.0f s (its driver is gone)",
                        self.where, Holder(**record["holder"]).describe(), time.time() - record["renewed_at"])
        self._write()
        time.sleep(self.settle_s)  # a driver that wrote in the same moment has written by now
        record = self._read()
        if record is None or Holder(**record["holder"]) != self.holder:
            raise LeaseError(self._held_by(record) if record else f"{self.where} vanished while it was taken")
        self._renewer = threading.Thread(target=self._renew, name="sppo-lease", daemon=True)
        self._renewer.start()
        log.info("lease %s taken (%s)", self.where, self.holder.describe())

    def release(self) -> None:
        """Stop renewing and remove the lease if it is still this driver's."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
            self._renewer = None
            record = self._read()
            if record is not None and Holder(**record["holder"]) == self.holder:
                self.fs.delete_file(self.path)

    def _held_by(self, record: dict) -> str:
        holder = Holder(**record["holder"])
        age = time.time() - float(record["renewed_at"])
        return (f"output directory in use: {self.where} is held by {holder.describe()}, renewed {age:.0f} s ago. "
                f"Wait for that job to end (or stop it: ray job stop {holder.submission_id or '<id>'}); a lease "
                f"that is not renewed for {self.ttl_s:.0f} s is taken over. --force does not override it")

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                self._write()
            except OSError as err:  # a storage hiccup: the next renewal may succeed
                log.warning("renewing the lease %s failed: %s", self.where, err)

    def _read(self) -> dict | None:
        """The lease record, or None when there is none or it is not one (nobody holds it then)."""
        try:
            with self.fs.open_input_stream(self.path) as stream:
                record = json.loads(stream.read())
            Holder(**record["holder"])
            float(record["renewed_at"])
            return record
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):  # torn or foreign: no one holds it
            return None

    def _write(self) -> None:
        data = json.dumps({"holder": asdict(self.holder), "renewed_at": time.time()}).encode()
        parent = self.path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):  # whole or absent, by rename
            staging = f"{self.path}.{self.holder.token}"
            with self.fs.open_output_stream(staging) as out:
                out.write(data)
            self.fs.move(staging, self.path)
        else:  # an object store shows a single upload only once complete
            with self.fs.open_output_stream(self.path) as out:
                out.write(data)
