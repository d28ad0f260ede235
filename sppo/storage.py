"""Publishing files and directories whole or not at all, and the shared storage a run can live in.

- `write_then_replace`, `atomic_write_text`, `atomic_write_parquet`: a file appears at its path
  only when complete (written to a temporary sibling, then renamed), so a file that exists is
  whole. `publish_directory` does the same for a directory (checkpoints, cached models).
- `SharedStorage`: a `storage_uri` (a shared path, s3://, gs://: anything `pyarrow.fs` opens)
  that holds a copy of output_dir; the run directory (sppo/run_directory.py) uploads to it
  explicitly, and nodes read models from it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

log = logging.getLogger("sppo.storage")


def write_then_replace(path: Path, write) -> None:
    """Publish `path` whole or not at all: `write(tmp)` fills a temporary sibling, which is then
    renamed over `path`; on any failure the sibling is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its 0600 would be the published file's mode. This one gets the umask's, as any new file.
    tmp = str(path.parent / f".{path.name}.{uuid.uuid4().hex}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
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
    # Not mkdtemp (0700): the umask's mode, as any new directory, kept whatever fill does to it.
    staging = target.parent / f".{target.name}.staging-{uuid.uuid4().hex}"
    staging.mkdir(0o777)
    aside = target.parent / f".{target.name}.replaced-{uuid.uuid4().hex[:8]}"
    try:
        mode = staging.stat().st_mode & 0o7777
        fill(staging)
        staging.chmod(mode)  # copytree's copystat, for one, would give it the source's
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


def follow_umask(path: Path) -> None:
    """Give a file that a library wrote through an owner-only temporary (safetensors does) the mode
    any new file gets: 0666 less the umask."""
    path.chmod(0o666 & ~_umask())


def _umask() -> int:
    # Linux shows it; os.umask reads it only by setting it, which races with other threads' writes.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())

    write_then_replace(path, write)


def atomic_write_parquet(path: Path, rows: list[dict]) -> None:
    write_then_replace(path, lambda tmp: pq.write_table(pa.Table.from_pylist(rows), tmp))


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


# ---------------------------------------------------------------- shared storage


def is_uri(spec: str) -> bool:
    return "://" in spec


class StorageError(OSError):
    """The shared storage (storage_uri) cannot be opened, read or written."""


class SharedStorage:
    """storage_uri's copy of output_dir: where a run's outputs live for every node.

    The driver publishes each file in output_dir first (atomically) and uploads it right after
    (`sppo.run_directory.RunDirectory`); a file missing from the storage counts as never
    published, so `sync_down` sets it aside.
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
        """The run's shared storage; None without storage_uri (output_dir is then the storage)."""
        return None if uri is None else cls(uri, output_dir)

    def _relative(self, local: Path) -> str:
        return Path(local).resolve().relative_to(self.local_root).as_posix()

    def remote_path(self, local: Path) -> str:
        return f"{self.base}/{self._relative(local)}"

    def worker_spec(self, spec: str) -> str:
        """What a worker on any node is given for a model: the storage URI of a path under
        output_dir, anything else (hub id, tiny:, another path) as it is."""
        if is_uri(spec) or spec.startswith("tiny:"):
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
