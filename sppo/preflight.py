"""Everything about a run that can be known before compute, checked before Ray or MLflow is used.

`check_run` raises `PreflightError` with one line that names the field, file (and line or row)
at fault and what to do. It writes nothing: a run that fails it leaves no lineage, no MLflow
run and no state behind, so fixing the input and submitting again in the same output directory
works. `preflight` (with shared storage, after syncing output_dir from it) runs it, then makes
the output directory and checks and records the lineage. `python -m sppo.run --plan` runs
`check_run` too, in plan mode: the checks that need what only the cluster may reach (the hub,
the tracking server, the shared output directory) are tried where that answers here and listed
as not checked where it does not, and no dataset or model is downloaded; every local check
still refuses. The job itself refuses all of them, except a hub that does not answer (an
offline cluster with the model in its cache): that is logged and the job goes on.

Checks, in order: flags (--resume-from), model directories (config, safetensors headers,
tokenizer, the policy's chat template), the settings of the judge (and of eval.judge) for its kind, the output
directory's state files (`manifest.json`, `run.json`: parsed, and the tracking URI the run
was recorded at), every iteration's prompts and the
held-out prompts (readable, strings, enough for one global batch after de-duplication,
held-out and length filtering), the tracking URI (a supported scheme that answers) and the
names MLflow validates later (experiment, registered model), then whether output_dir is writable.
A model spec that is no path, tiny: model or storage URI must be a well-formed hub id whose
metadata the hub serves to this machine's token.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
from pathlib import Path

from sppo.config import JudgeConfig, RunConfig
from sppo.manifest import RunManifest
from sppo.models import is_hub_id, is_local_path, local_model_dir
from sppo.prompts import (HUB_PREFIX, PromptSourceError, dataset_responses, heldout_prompts, iteration_prompts,
                          prompt_length_filter)
from sppo.roles import own_eval_judge
from sppo.run_directory import MANIFEST_FILE, RUN_FILE, RunDirectory
from sppo.storage import SharedStorage, StorageError, is_uri
from sppo.tracking import check_reachable, tracked_elsewhere

log = logging.getLogger("sppo.preflight")

# MLflow stores a run's records in one of these; anything else fails only when the job logs.
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks")
# Model ids of the judge kinds, so a judge.path of the other kind is caught before any compute.
PAIRRM_MODELS = ("tiny:pairrm", "llm-blender/PairRM")
REWARD_MODELS = ("tiny:reward",)
# Seconds the hub has to answer a model's metadata request before it counts as unreachable.
HUB_TIMEOUT_S = 10.0


class PreflightError(ValueError):
    """A precondition of the run that does not hold; the message names the field or file."""


class NotCheckedHere(PreflightError):
    """A check that needs what the cluster reaches (the hub, the tracking server, the shared
    output directory), which does not answer from this machine."""


def check_run(cfg: RunConfig, resume_from: int | None = None, plan: bool = False) -> list[str]:
    """Every check that needs no cluster and writes nothing (see the module's docstring). Returns
    the checks not made here, one line each. plan: those a cluster would answer are listed
    instead of refused."""
    out = Path(cfg.output_dir).resolve()
    unchecked: list[str] = []

    def needs_cluster(check, *args, job_refuses: bool = True) -> bool:
        """Whether the check was made (and passed)."""
        try:
            check(*args)
        except NotCheckedHere as err:
            if job_refuses and not plan:
                raise
            unchecked.append(str(err))
            if not plan:
                log.warning("not checked here: %s", err)
            return False
        return True

    # The job makes output_dir; --plan may run where the cluster's shared storage is not mounted.
    here = not plan or needs_cluster(check_output_dir_here, out)
    if resume_from is not None:
        check_resume(out, resume_from, cfg.iterations, checkpoint=here)
    judges = {"judge": cfg.judge, **({"eval.judge": own} if (own := own_eval_judge(cfg)) is not None else {})}
    for section, judge in judges.items():
        check_judge(section, judge)
    tokenizer = check_model_dir("policy.path", cfg.policy.path, cfg.policy.trust_remote_code, chat_template=True)
    needs_cluster(check_hub_model, "policy.path", cfg.policy.path, job_refuses=False)
    if cfg.train.lora is not None:
        check_lora_targets(cfg.train.lora.target_modules, cfg.policy.path)
    for section, judge in judges.items():
        if judge.model_path is not None:
            check_model_dir(f"{section}.path", judge.model_path, judge.trust_remote_code)
            needs_cluster(check_hub_model, f"{section}.path", judge.model_path, job_refuses=False)
    if here:
        check_state_files(out, cfg.tracking.resolved_uri)
    if plan and cfg.prompts.source.startswith(HUB_PREFIX):  # reading them would download the dataset
        unchecked.append(f"prompts.source {cfg.prompts.source}: a Hugging Face hub dataset, which --plan does "
                         "not download; the job reads and counts every iteration's prompts before it starts")
    else:
        check_prompts(cfg, tokenizer)
    check_tracking(cfg)
    needs_cluster(check_tracking_server, cfg)
    if here:
        needs_cluster(check_writable, out)
    return unchecked


def preflight(cfg: RunConfig, resume_from: int | None = None, force: bool = False,
              storage: SharedStorage | None = None, checked: bool = False) -> RunManifest:
    """`check_run`, then the output directory (and storage, whose run output_dir is then made
    equal to) and the lineage, refused when changed and recorded on first use. checked: an
    earlier preflight passed on this output directory; `check_run` (which reads and tokenizes
    every iteration's prompts) is then run again only after storage changed the directory."""
    out = Path(cfg.output_dir).resolve()
    if storage is not None:  # output_dir first becomes what the storage holds
        check_writable(out)
        out.mkdir(parents=True, exist_ok=True)
        try:
            storage.check_writable()
            storage.sync_down()
        except StorageError as err:
            raise PreflightError(str(err)) from err
    if not checked or storage is not None:
        check_run(cfg, resume_from)
    out.mkdir(parents=True, exist_ok=True)
    manifest = RunManifest(RunDirectory(out, storage))
    manifest.check_lineage(cfg, force=force)  # refused before anything is recorded
    return manifest


def check_resume(out: Path, resume_from: int, iterations: int, checkpoint: bool = True) -> None:
    """checkpoint: also that iteration N-1's checkpoint is in output_dir."""
    if not 1 <= resume_from <= iterations:
        raise PreflightError(f"--resume-from {resume_from}: must be between 1 and the number of iterations ({iterations})")
    previous = RunDirectory(out).iteration(resume_from - 1)
    if checkpoint and resume_from > 1 and not previous.trained:
        raise PreflightError(
            f"--resume-from {resume_from}: iteration {resume_from - 1}'s checkpoint "
            f"{previous.checkpoint} is missing or incomplete"
        )


def check_judge(section: str, judge: JudgeConfig) -> None:
    """A judge's path that belongs to the other judge kind (the default path is PairRM's); section
    names it in the config: judge, or eval.judge."""
    kind, path = judge.kind, judge.path
    if kind == "reward_model" and path in PAIRRM_MODELS:
        raise PreflightError(f"{section}.path: {section}.kind 'reward_model' needs a reward model (e.g. tiny:reward "
                             f"or RLHFlow/ArmoRM-Llama3-8B-v0.1), but {section}.path is the PairRM model {path!r}")
    if kind == "pairrm" and path in REWARD_MODELS:
        raise PreflightError(f"{section}.path: {section}.kind 'pairrm' needs a PairRM model (e.g. llm-blender/PairRM), "
                             f"but {section}.path is the reward model {path!r}; or set {section}.kind: reward_model")


def check_model_dir(field: str, spec: str, trust_remote_code: bool = False, chat_template: bool = False):
    """A local model directory must hold a readable config, weights whose safetensors headers
    parse, and a tokenizer (with a chat template where prompts are rendered with one). Returns
    the loaded tokenizer, or None for a model that is not on this machine."""
    path = local_model_dir(spec)
    if path is None:
        return None
    if not (path / "config.json").is_file():
        raise PreflightError(f"{field}: {path} is not a readable model directory (no config.json)")
    try:
        json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise PreflightError(f"{field}: {path / 'config.json'} is not readable JSON: {err}") from err
    weights = sorted(path.glob("*.safetensors"))
    if not weights and not list(path.glob("*.bin")):
        raise PreflightError(f"{field}: {path} holds no weights (*.safetensors or *.bin)")
    from safetensors import safe_open

    for file in weights:
        try:
            with safe_open(str(file), "pt") as opened:
                opened.keys()
        except Exception as err:  # safetensors raises its own error types for a bad header
            raise PreflightError(f"{field}: {file} is not a readable safetensors file: {err}") from err
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as err:  # transformers raises many kinds for a broken tokenizer
        raise PreflightError(f"{field}: {path} has no loadable tokenizer: {err}") from err
    if chat_template and not tokenizer.chat_template:
        raise PreflightError(f"{field}: {path}'s tokenizer has no chat template (prompts are rendered with it)")
    return tokenizer


def check_lora_targets(targets: list[str], spec: str) -> None:
    """Each of train.lora.target_modules names a linear layer of a local policy, read from its
    safetensors headers (no weights loaded): peft matches a target by its module name's last
    part. A policy that is not on this machine is checked when training starts."""
    path = local_model_dir(spec)
    if path is None:
        return
    from safetensors import safe_open

    names = set()
    for file in path.glob("*.safetensors"):
        with safe_open(str(file), "pt") as opened:
            names.update(key[: -len(".weight")].rsplit(".", 1)[-1] for key in opened.keys()
                         if key.endswith(".weight") and len(opened.get_slice(key).get_shape()) == 2)
    if names and (missing := [t for t in targets if t not in names]):
        raise PreflightError(f"train.lora.target_modules: {', '.join(missing)} name no layer of policy.path {path} "
                             f"(its matrices: {', '.join(sorted(names))})")


def check_state_files(out: Path, tracking_uri: str) -> None:
    """The output directory's own records, when present, must parse and have their shape; its
    MLflow parent run must be on the tracking server this run uses."""
    shapes = {MANIFEST_FILE: ("lineage", "iterations"), RUN_FILE: ("parent_run_id", "experiment_id")}
    for name, keys in shapes.items():
        path = out / name
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise PreflightError(f"{path}: not readable JSON ({err}); move it aside to start this output "
                                 "directory afresh") from err
        if not isinstance(data, dict) or any(key not in data for key in keys):
            raise PreflightError(f"{path}: not a {name} written by sppo (expected the keys {', '.join(keys)}); "
                                 "move it aside or use another --output-dir")
        if name == RUN_FILE and (problem := tracked_elsewhere(path, data, tracking_uri)):
            raise PreflightError(problem)


def check_prompts(cfg: RunConfig, tokenizer) -> None:
    """Every iteration's prompts read, and hold at least one global batch after filtering; the
    held-out prompts, length-filtered the same way (with the policy's tokenizer, None for a policy
    not on this machine: no length filter), are not all too long."""
    too_long = prompt_length_filter(tokenizer, cfg.train.max_prompt_length) if tokenizer is not None else None
    batch = cfg.train.global_batch_size
    try:
        for t in range(1, cfg.iterations + 1):
            selection = iteration_prompts(cfg.prompts, t, too_long=too_long)
            dataset_responses(cfg.prompts, t)  # hybrid candidates' column, when configured
            if len(selection.prompts) < batch:
                raise PreflightError(
                    f"prompts: iteration {t} keeps {len(selection.prompts)} prompts, fewer than one global batch "
                    f"of {batch} (train.per_device_batch_size x gradient_accumulation_steps x num_workers): "
                    f"{selection.shortage(t, cfg.train.max_prompt_length)}; use a larger prompts.source or "
                    "prompts.per_iteration, fewer held-out prompts, or a smaller batch"
                )
        if cfg.prompts.eval_size or cfg.prompts.eval_split:
            heldout_prompts(cfg.prompts, too_long=too_long)
    except PromptSourceError as err:
        raise PreflightError(str(err)) from err


def _tracking_field() -> str:
    return "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "tracking.tracking_uri"


def check_tracking(cfg: RunConfig) -> None:
    """A tracking URI MLflow can store runs in; names MLflow would refuse later."""
    uri = cfg.tracking.resolved_uri
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    if scheme.split("+")[0] not in TRACKING_SCHEMES:
        raise PreflightError(f"{_tracking_field()}: {uri!r} has the scheme {scheme!r}, which MLflow cannot track to "
                             f"(use one of {', '.join(TRACKING_SCHEMES)})")
    for name_field, problem in (("tracking.experiment", experiment_name_problem(cfg.tracking.experiment)),
                                ("tracking.register_model", model_name_problem(cfg.tracking.register_model))):
        if problem is not None:
            raise PreflightError(f"{name_field}: {problem}")


# MLflow's rules for the names it stores, which its server applies once the job gets there. MLflow
# keeps its validators private; tests/test_tracking.py checks these against them.
MAX_EXPERIMENT_NAME_LENGTH = 500


def experiment_name_problem(name: str) -> str | None:
    if not name:
        return f"Invalid experiment name: '{name}'"
    if len(name) > MAX_EXPERIMENT_NAME_LENGTH:
        return f"an experiment name is at most {MAX_EXPERIMENT_NAME_LENGTH} characters, this one {len(name)}"
    return None


def model_name_problem(name: str | None) -> str | None:
    """None: no model is registered."""
    if name is None:
        return None
    if not name.strip():
        return "a registered model's name cannot be empty"
    if "/" in name or ":" in name:
        return f"Invalid model name '{name}'. Names cannot contain '/' or ':'."
    as_path = posixpath.normpath(name)
    if as_path != name or as_path == "." or as_path.startswith(".."):
        return f"Invalid model name '{name}': as a file name it would resolve to {as_path!r}"
    return None


def check_tracking_server(cfg: RunConfig) -> None:
    """An HTTP tracking server answers."""
    try:
        check_reachable(cfg.tracking.resolved_uri, attempts=1)
    except RuntimeError as err:
        raise NotCheckedHere(f"{_tracking_field()}: {err}") from err


def check_hub_model(field: str, spec: str) -> None:
    """A model spec that is no path here, tiny: model or storage URI is a hub id: well-formed,
    and a model the hub serves to this machine's token (its metadata only: nothing is
    downloaded). NotCheckedHere when the hub does not answer."""
    if is_uri(spec) or spec.startswith("tiny:") or is_local_path(spec):
        return
    if not is_hub_id(spec):
        raise PreflightError(f"{field}: {spec!r} is neither a path that exists here nor a Hugging Face hub id "
                             "(name or org/name, of letters, digits, '-', '_' and '.', at most 96 characters); "
                             "check the path, or write it from / or ./")
    import httpx2
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    where = f"{field}: {spec} on the Hugging Face hub ({constants.ENDPOINT})"
    if constants.is_offline_mode():
        raise NotCheckedHere(f"{where}: HF_HUB_OFFLINE is set here")
    token = get_token()
    try:  # HfApi.auth_check's request, with a timeout: the hub's client has none
        response = get_session().get(f"{constants.ENDPOINT}/api/models/{spec}/auth-check",
                                     headers=build_hf_headers(token=token), timeout=HUB_TIMEOUT_S)
        hf_raise_for_status(response)
    except GatedRepoError as err:
        why = ("no Hugging Face token is set here (HF_TOKEN)" if token is None else
               "this token's account has not been granted access")
        raise PreflightError(f"{field}: {spec} is a gated model and {why}; accept its licence at "
                             f"{constants.ENDPOINT}/{spec} and use that account's token") from err
    except RepositoryNotFoundError as err:
        private = " (or it is private or gated: set HF_TOKEN)" if token is None else " that this token can read"
        raise PreflightError(f"{field}: the Hugging Face hub has no model {spec}{private}") from err
    except HfHubHTTPError as err:  # a hub that answers with an error of its own (5xx, rate limit)
        status = err.response.status_code if err.response is not None else "an error"
        raise NotCheckedHere(f"{where}: the hub answered {status}") from err
    except (OSError, httpx2.TransportError) as err:  # offline mode, DNS, refused, timed out
        raise NotCheckedHere(f"{where}: the hub does not answer here ({type(err).__name__})") from err


def check_output_dir_here(out: Path) -> None:
    """--plan: an output_dir of which no directory exists here below the filesystem's root is on
    the cluster's storage, which this machine does not see."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if existing == Path(existing.anchor):
        raise NotCheckedHere(f"output_dir: {out} is not on this machine; the job checks that it is writable and "
                             "its state files (run.json, manifest.json, --resume-from's checkpoint) on the cluster")


def check_writable(out: Path) -> None:
    """output_dir, or the nearest existing directory above it, takes a file; nothing is left."""
    # Trying beats os.access: root passes permission checks that a read-only mount still fails.
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise PreflightError(f"output_dir: {existing} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".sppo-write-check-"):
            pass
    except OSError as err:
        raise NotCheckedHere(f"output_dir: {out} is not writable: {err.strerror or err}") from err
