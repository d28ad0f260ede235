"""The output directory: per-iteration stage outputs, each published atomically.

A stage output appears at its final path only when complete (write to a temporary
sibling, then rename), so a file that exists is always whole and a resumed job can
trust it.

    <output_dir>/run.json                parent MLflow run id (sppo.tracking)
    <output_dir>/manifest.json           per-stage status, outputs, hashes, run ids (sppo.manifest)
    <output_dir>/config.yaml             resolved config of the latest submission
    <output_dir>/iter-N/samples.parquet    prompt, candidates[K]
    <output_dir>/iter-N/judgments.parquet  prompt, candidates[K], win_matrix[K][K]
    <output_dir>/iter-N/pairs.parquet      SPPO training rows
    <output_dir>/iter-N/stage_metrics.json stage metrics, replayed into a fresh MLflow run
    <output_dir>/iter-N/train_history.json per-step training metrics (written after training)
    <output_dir>/iter-N/checkpoint/        consolidated HF checkpoint (safetensors) = pi_N

With `storage_uri` set (a shared path, s3://, gs://: anything `pyarrow.fs` opens), that is where
the run lives: every file above is uploaded there as soon as it is published locally, the
training workers write the checkpoint there, and engines, judges and workers read models only
from there (`local_model`), never from the driver's disk. output_dir is then the driver's copy,
made equal to the storage at the start of every submission (`SharedStorage.sync_down`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger("sppo.storage")


def write_then_replace(path: Path, write) -> None:
    """Publish `path` whole or not at all: `write(tmp)` fills a temporary sibling, which is then
    renamed over `path`; on any failure the sibling is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as err:
        if err.errno is None or err.filename is not None:
            raise
        # pyarrow's and a plain write()'s errors (a full disk above all) name no file.
        raise OSError(err.errno, f"cannot publish it: {os.strerror(err.errno)}", str(path)) from err
    finally:
        Path(tmp).unlink(missing_ok=True)


def publish_directory(target: Path, fill, *, keep_existing: bool = False) -> None:
    """Publish directory `target` whole or not at all: `fill(staging)` fills a sibling, which then
    takes target's place. An existing target is set aside first and removed only once the new
    one is in place, or, with keep_existing, kept instead (a concurrent publisher of the same
    content won). On any failure the sibling is removed and target is as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    aside = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:8]}"
    try:
        fill(staging)
        staging.chmod(0o755)  # mkdtemp makes it 0700
        if target.exists() and not keep_existing:
            target.rename(aside)
        try:
            staging.rename(target)
        except OSError:
            if aside.exists():
                aside.rename(target)
            if not (keep_existing and target.exists()):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    write_then_replace(path, write)
    _push_to_shared_storage(path)


def atomic_write_parquet(path: Path, rows: list[dict]) -> None:
    write_then_replace(path, lambda tmp: pq.write_table(pa.Table.from_pylist(rows), tmp))
    _push_to_shared_storage(path)


def read_parquet(path: Path, columns: list[str] | None = None, limit: int | None = None) -> list[dict]:
    """A parquet file's rows (only `columns`, only the first `limit`: read no further than needed)."""
    if limit is None:
        return pq.read_table(path, columns=columns).to_pylist()
    rows: list[dict] = []
    for batch in pq.ParquetFile(path).iter_batches(batch_size=max(limit, 1), columns=columns):
        rows += batch.to_pylist()[: limit - len(rows)]
        if len(rows) >= limit:
            break
    return rows


RUN_CONFIG_FILE = "config.yaml"  # the resolved config of the run, in its output directory


@dataclass(frozen=True)
class IterationDir:
    root: Path
    iteration: int

    @property
    def path(self) -> Path:
        return self.root / f"iter-{self.iteration}"

    @property
    def samples(self) -> Path:
        return self.path / "samples.parquet"

    @property
    def judgments(self) -> Path:
        return self.path / "judgments.parquet"

    @property
    def pairs(self) -> Path:
        return self.path / "pairs.parquet"

    @property
    def stage_metrics(self) -> Path:
        return self.path / "stage_metrics.json"

    @property
    def train_history(self) -> Path:
        return self.path / "train_history.json"

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"

    @property
    def trained(self) -> bool:
        """Training is done when both its checkpoint and its metric history were published."""
        return (self.checkpoint / "config.json").exists() and self.train_history.exists()

    def read_metrics(self) -> dict[str, float]:
        return json.loads(self.stage_metrics.read_text()) if self.stage_metrics.exists() else {}

    def add_metrics(self, metrics: dict[str, float]) -> None:
        atomic_write_text(self.stage_metrics, json.dumps({**self.read_metrics(), **metrics}, indent=2))

    def archive(self) -> Path | None:
        """Move this iteration's outputs aside (nothing is deleted); returns where they went."""
        if not self.path.exists():
            return None
        n = 1
        while (target := self.root / f"iter-{self.iteration}.superseded-{n}").exists():
            n += 1
        shutil.move(str(self.path), str(target))
        for shared in _shared_storages(self.path):
            shared.move(self.path, target)
        return target


# ---------------------------------------------------------------- shared storage


def is_uri(spec: str) -> bool:
    return "://" in spec


def is_local_path(spec: str) -> bool:
    """A model spec that names a directory on this machine (not a storage URI, not tiny:)."""
    return not (is_uri(spec) or spec.startswith("tiny:"))


class StorageError(OSError):
    """The shared storage (storage_uri) cannot be opened, read or written."""


# Stage outputs are written from many modules through atomic_write_*; the storage they belong
# to is looked up here rather than passed down every call chain.
_OPEN_STORAGES: dict[Path, "SharedStorage"] = {}


def _shared_storages(path: Path) -> list["SharedStorage"]:
    path = path.resolve()
    return [s for root, s in _OPEN_STORAGES.items() if path.is_relative_to(root)]


def _push_to_shared_storage(path: Path) -> None:
    for shared in _shared_storages(path):
        shared.push(path)


class SharedStorage:
    """storage_uri's copy of output_dir: where a run's outputs live for every node.

    The driver publishes each file in output_dir first (atomically) and uploads it right after;
    a file missing from the storage counts as never published, so `sync_down` sets it aside.
    Object stores make a single upload visible whole; on a shared path it is renamed into place.
    """

    def __init__(self, uri: str, output_dir: Path):
        self.uri, self.local_root = uri.rstrip("/"), Path(output_dir).resolve()
        try:
            self.fs, self.base = pafs.FileSystem.from_uri(self.uri)
        except Exception as err:  # ArrowInvalid, or a client error from the store
            raise StorageError(f"storage_uri: cannot open {self.uri}: {err}") from err
        self.base = self.base.rstrip("/")

    @classmethod
    def open(cls, uri: str | None, output_dir: Path) -> "SharedStorage | None":
        """The run's shared storage (None without storage_uri: output_dir is then the storage),
        registered so that every atomic write under output_dir is uploaded."""
        if uri is None:
            return None
        shared = cls(uri, output_dir)
        _OPEN_STORAGES[shared.local_root] = shared
        return shared

    def close(self) -> None:
        _OPEN_STORAGES.pop(self.local_root, None)

    def _relative(self, local: Path) -> str:
        return Path(local).resolve().relative_to(self.local_root).as_posix()

    def remote_path(self, local: Path) -> str:
        return f"{self.base}/{self._relative(local)}"

    def worker_spec(self, spec: str) -> str:
        """What a worker on any node is given for a model: the storage URI of a path under
        output_dir, anything else (hub id, tiny:, another path) as it is."""
        if not is_local_path(spec):
            return spec
        try:
            return f"{self.uri}/{self._relative(Path(spec))}"
        except ValueError:
            return spec

    def check_writable(self) -> None:
        probe = f"{self.base}/.write-check-{os.getpid()}"
        try:
            self.fs.create_dir(self.base, recursive=True)
            with self.fs.open_output_stream(probe) as fh:
                fh.write(b"ok")
            self.fs.delete_file(probe)
        except Exception as err:
            raise StorageError(f"storage_uri: {self.uri} is not writable: {err}") from err

    def push(self, local: Path) -> None:
        """Upload a published file or directory under output_dir to the same place in storage."""
        local, target = Path(local), self.remote_path(local)
        try:
            if local.is_dir():
                upload_dir(local, self.fs, target)
            else:
                self._put_file(local, target)
        except Exception as err:
            raise StorageError(f"storage_uri: uploading {local} to {self.uri} failed: {err}") from err

    def _put_file(self, local: Path, target: str) -> None:
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):  # a shared path: whole or absent, by rename
            staging = f"{target}.uploading-{os.getpid()}"
            pafs.copy_files(str(local), staging, destination_filesystem=self.fs)
            self.fs.move(staging, target)
        else:  # an object store shows a single upload only once it is complete
            pafs.copy_files(str(local), target, destination_filesystem=self.fs)

    def pull(self, local: Path) -> None:
        """Download a directory published to storage (a checkpoint) into output_dir, atomically."""
        local = Path(local)
        try:
            publish_directory(local, lambda staging: pafs.copy_files(self.remote_path(local), str(staging),
                                                                      source_filesystem=self.fs))
        except Exception as err:
            raise StorageError(f"storage_uri: downloading {self.remote_path(local)} failed: {err}") from err

    def move(self, local_src: Path, local_dst: Path) -> None:
        src, dst = self.remote_path(local_src), self.remote_path(local_dst)
        if self.fs.get_file_info(src).type == pafs.FileType.NotFound:
            return
        pafs.copy_files(src, dst, source_filesystem=self.fs, destination_filesystem=self.fs)
        self.fs.delete_dir(src)

    def _listing(self) -> dict[str, int]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.base, recursive=True, allow_not_found=True))
        return {info.path[len(self.base) + 1:]: info.size for info in infos if info.type == pafs.FileType.File}

    def sync_down(self) -> None:
        """Make output_dir equal to the storage: download what is missing or differs, and move
        local files the storage lacks (never uploaded: not published) into `.unpublished/`."""
        try:
            remote = self._listing()
        except Exception as err:
            raise StorageError(f"storage_uri: cannot list {self.uri}: {err}") from err
        local = {p.relative_to(self.local_root).as_posix(): p for p in self.local_root.rglob("*")
                 if p.is_file() and not any(part.startswith(".") for part in p.relative_to(self.local_root).parts)}
        if "manifest.json" not in remote and any(name.startswith("iter-") for name in local):
            raise StorageError(
                f"storage_uri: {self.uri} holds no run, but output_dir {self.local_root} does; "
                "set storage_uri to where that run lives, or use a new output_dir"
            )
        aside = self.local_root / ".unpublished" / time.strftime("%Y%m%d-%H%M%S")
        for name in sorted(set(local) - set(remote)):
            (aside / name).parent.mkdir(parents=True, exist_ok=True)
            local[name].rename(aside / name)
            log.warning("%s is not in %s (never uploaded): moved to %s", local[name], self.uri, aside / name)
        fetched = 0
        for name, size in sorted(remote.items()):
            if name.startswith(".") or (name in local and local[name].stat().st_size == size
                                        and not name.endswith(".json") and not name.endswith(".yaml")):
                continue
            write_then_replace(self.local_root / name,
                               lambda tmp: pafs.copy_files(f"{self.base}/{name}", tmp, source_filesystem=self.fs))
            fetched += 1
        log.info("output_dir %s synced from %s: %d files fetched", self.local_root, self.uri, fetched)


def upload_dir(local: Path, fs: pafs.FileSystem, target: str) -> None:
    """Replace the directory `target` on fs with a copy of `local` (no stale files kept)."""
    if fs.get_file_info(target).type != pafs.FileType.NotFound:
        fs.delete_dir(target)
    fs.create_dir(target, recursive=True)
    pafs.copy_files(str(local), target, destination_filesystem=fs)


def local_model(spec: str) -> str:
    """A model directory on this node for `spec`: a storage URI is downloaded into this node's
    cache (keyed by the URI and the files' sizes and times, so a retrained checkpoint at the same
    URI is fetched again); tiny: models are built here; hub ids and paths pass through."""
    from sppo.tiny import cache_root, resolve_model

    if not is_uri(spec):
        return resolve_model(spec)
    try:
        fs, path = pafs.FileSystem.from_uri(spec)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    except Exception as err:
        raise StorageError(f"model {spec}: cannot list it: {err}") from err
    files = sorted((i.path, i.size, i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File)
    if not any(p.endswith("/config.json") for p, _, _ in files):
        raise FileNotFoundError(f"model {spec}: no config.json there")
    key = hashlib.sha256(json.dumps([spec, files]).encode()).hexdigest()[:16]
    target = cache_root() / "models" / f"{Path(path).parent.name}-{Path(path).name}-{key}"
    if not (target / "config.json").exists():
        # Whole or absent in the cache; of concurrent downloads on this node, one wins.
        publish_directory(target, lambda staging: pafs.copy_files(path, str(staging), source_filesystem=fs),
                          keep_existing=True)
        log.info("model %s downloaded to %s", spec, target)
    return str(target)
