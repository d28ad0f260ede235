"""`python -m ray_jobs.submit`: its pure core, and real jobs on a live Ray head (token auth on)."""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import uuid

import pytest

from ray_jobs.submit import (
    DEFAULT_RUNTIME_ENV,
    SecretMasker,
    build_runtime_env,
    exit_status,
    load_runtime_env,
    parse_env,
    secrets_from,
)
from sppo.secrets import MASK
from tests.live_stack import REPO, SECRETS, VENV_BIN, assert_no_secrets, client_env

# ---------------------------------------------------------------- pure core


def test_secrets_come_from_the_environment_and_named_extras_must_exist():
    environ = {"HF_TOKEN": "t", "PATH": "/bin", "MY_DB_PASS": "p", "AWS_REGION": "eu", "EMPTY_API_KEY": ""}
    assert secrets_from(environ) == {"AWS_REGION": "eu", "HF_TOKEN": "t"}  # empty values are not passed
    assert secrets_from(environ, ["MY_DB_PASS"])["MY_DB_PASS"] == "p"
    with pytest.raises(ValueError, match="--secret NOPE: not set"):
        secrets_from(environ, ["NOPE"])


def test_runtime_env_yaml_uploads_the_repo_without_heavy_or_private_directories():
    base = load_runtime_env(DEFAULT_RUNTIME_ENV)
    assert base["working_dir"] == "."
    for excluded in (".git/", ".venv/", "outputs/", ".run/", "mlruns/"):
        assert excluded in base["excludes"]


def test_runtime_env_merges_variables_then_secrets_and_resolves_the_working_dir(tmp_path):
    base = {"working_dir": ".", "excludes": [".git/"], "env_vars": {"A": "1", "MLFLOW_TRACKING_URI": "old"}}
    env = build_runtime_env(base, working_dir=str(tmp_path),
                            env_vars={"MLFLOW_TRACKING_URI": "http://m:5000", "HF_HOME": None},
                            secrets={"HF_TOKEN": "s"})
    assert env["working_dir"] == str(tmp_path.resolve()) and env["excludes"] == [".git/"]
    assert env["env_vars"] == {"A": "1", "MLFLOW_TRACKING_URI": "http://m:5000", "HF_TOKEN": "s"}
    assert base["env_vars"]["MLFLOW_TRACKING_URI"] == "old"  # the loaded base is not modified
    with pytest.raises(ValueError, match="working_dir .*: not a directory"):
        build_runtime_env(base, working_dir=str(tmp_path / "missing"))


def test_secret_values_on_the_command_line_are_refused():
    assert parse_env(["HF_HOME=/shared/hf"]) == {"HF_HOME": "/shared/hf"}
    with pytest.raises(ValueError, match="--env HF_TOKEN: a secret's value .* export it and it is passed"):
        parse_env(["HF_TOKEN=abc"])
    # A secret that is not passed unasked: exported, it must be named.
    with pytest.raises(ValueError, match="--env GITHUB_TOKEN: .* pass it with --secret GITHUB_TOKEN"):
        parse_env(["GITHUB_TOKEN=abc"])
    with pytest.raises(ValueError, match="expected NAME=VALUE"):
        parse_env(["novalue"])


def test_exit_status_follows_the_job():
    assert exit_status("SUCCEEDED", 0) == 0
    assert exit_status("FAILED", 3) == 3
    assert exit_status("FAILED", None) == 1  # e.g. the runtime env could not be set up
    assert exit_status("STOPPED", None) == 1
    with pytest.raises(ValueError, match="not terminal"):
        exit_status("RUNNING", None)


def test_masker_catches_a_secret_split_across_log_chunks():
    masker = SecretMasker(["hunter2", "hunter2-long", ""])
    out = masker.feed("user pass=hun") + masker.feed("ter2 and hunter2-long\nnext hunt") + masker.feed("er2")
    out += masker.flush()
    assert out == f"user pass={MASK} and {MASK}\nnext {MASK}"


# ---------------------------------------------------------------- real jobs

# Runs as the job's entrypoint: checks what the helper promised arrived, then prints a secret
# on purpose, so that the test can see the helper mask it.
_CHECK_JOB = """
import hashlib, os, pathlib, sys
import ray
assert os.environ['MLFLOW_TRACKING_URI'] == sys.argv[1], 'MLFLOW_TRACKING_URI'
assert os.environ['HF_HOME'] == sys.argv[2], 'HF_HOME'
ray.init()
reserved = ray.cluster_resources()['CPU'] - ray.available_resources().get('CPU', 0.0)
assert reserved == float(sys.argv[3]), f'the entrypoint holds {reserved} CPUs'
for name, digest in zip(sys.argv[4::2], sys.argv[5::2]):
    assert hashlib.sha256(os.environ[name].encode()).hexdigest() == digest, name
here = pathlib.Path('.')
assert (here / 'sppo' / 'run.py').is_file(), 'the repository is the working directory'
assert not [d for d in ('.git', '.venv', 'outputs') if (here / d).exists()], 'excluded directories'
print('the job prints a secret:', os.environ['HF_TOKEN'], flush=True)
print('all checks passed in the job', flush=True)
"""


def _helper_env(stack) -> dict[str, str]:
    return client_env(stack, **SECRETS)


def _helper_cmd(stack, *options: str) -> list[str]:
    return [sys.executable, "-m", "ray_jobs.submit", "--address", stack.dashboard_url,
            "--mlflow-uri", stack.mlflow_url, *options]


def _run_helper(stack, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(_helper_cmd(stack, *args), cwd=REPO, env=_helper_env(stack), capture_output=True,
                          text=True, timeout=600)
    assert_no_secrets("the submit helper's output", done.stdout + done.stderr)
    return done


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(900)
def test_submit_passes_env_and_secrets_sets_resources_and_exits_with_the_job_status(live_stack, tmp_path):
    hf_home = str(tmp_path / "hf")
    digests = [x for name, value in SECRETS.items() for x in (name, hashlib.sha256(value.encode()).hexdigest())]
    job_id = f"sppo-test-ok-{uuid.uuid4().hex[:8]}"
    ok = _run_helper(live_stack, "--hf-home", hf_home, "--entrypoint-num-cpus", "0.5", "--submission-id", job_id,
                     "--", "python", "-c", _CHECK_JOB, live_stack.mlflow_url, hf_home, "0.5", *digests)
    assert ok.returncode == 0, ok.stdout[-4000:] + ok.stderr[-4000:]
    assert "all checks passed in the job" in ok.stdout
    assert f"the job prints a secret: {MASK}" in ok.stdout  # it reached the job, not the helper's output
    assert f"job {job_id} SUCCEEDED (exit status 0)" in ok.stdout
    names = re.search(r"secrets passed from your environment \(values not shown\): (.*)", ok.stdout).group(1)
    assert set(names.split(", ")) >= set(SECRETS)

    failed = _run_helper(live_stack, "--", "python", "-c", "import sys; print('failing on purpose'); sys.exit(3)")
    assert failed.returncode == 3, failed.stdout[-4000:] + failed.stderr[-4000:]
    assert "failing on purpose" in failed.stdout and "FAILED (exit status 3)" in failed.stdout


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_stopped_job_exits_non_zero(live_stack):
    job_id = f"sppo-test-stop-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        _helper_cmd(live_stack, "--submission-id", job_id, "--", "python", "-c",
                    "import time; print('job started', flush=True); time.sleep(300)"),
        cwd=REPO, env=_helper_env(live_stack), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    seen = []
    try:
        for line in proc.stdout:  # the job really runs before it is stopped
            seen.append(line)
            if "job started" in line:
                break
        subprocess.run([str(VENV_BIN / "ray"), "job", "stop", "--address", live_stack.dashboard_url, job_id],
                       env=_helper_env(live_stack), capture_output=True, timeout=120, check=True)
        rest, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    output = "".join(seen) + rest
    assert proc.returncode == 1, output[-4000:]
    assert f"job {job_id} STOPPED (exit status 1)" in output
