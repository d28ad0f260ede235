"""Model resolution: what a model spec names, and a directory on this node for it.

A spec is one of: `tiny:<name>` (built from code into the cache, sppo/tiny), a storage URI
(s3://..., gs://...: a checkpoint in a run's shared storage, downloaded into this node's cache),
a local directory (a path from /, ./, ../ or ~, or a relative one that exists), or a Hugging Face
hub id (`name` or `org/name`, loaded by transformers/vLLM where it is used).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pyarrow.fs as pafs

from sppo.storage import StorageError, is_uri, publish_directory

log = logging.getLogger("sppo.models")


PATH_PREFIXES = ("/", "./", "../", "~")


def is_local_path(spec: str) -> bool:
    """A model spec that names a path on this machine: written as one (/, ./, ../, ~), or a
    relative path that exists here, as transformers and vLLM read it too (not a storage URI, a
    tiny: model or a hub id)."""
    if spec.startswith(PATH_PREFIXES):
        return True
    return not (is_uri(spec) or spec.startswith("tiny:")) and Path(spec).exists()


def absolute_path(spec: str) -> str:
    """A local path made absolute here (a worker's working directory is not the driver's);
    storage URIs, tiny: models, hub ids and absolute paths as they are."""
    return os.path.abspath(os.path.expanduser(spec)) if spec and is_local_path(spec) else spec


def local_model_dir(spec: str) -> Path | None:
    """The directory a model spec names on this machine: a local path, or a tiny: model (built
    on first use); None for hub ids and storage URIs, which are fetched where they are used."""
    if is_local_path(spec):
        return Path(spec).expanduser()
    if spec.startswith("tiny:"):
        from sppo.tiny import resolve_model

        return Path(resolve_model(spec))
    return None


def is_hub_id(spec: str) -> bool:
    """A well-formed hub model id (`name` or `org/name`), by the hub's own rules."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return True


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
