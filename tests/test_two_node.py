"""Two Ray nodes on this machine: a real 2-iteration tiny run spreads its vLLM engines and its
training workers over both, keeps every output in shared storage (S3), and finishes.

Two `ray start` processes (sppo.devtools.localstack): a head and a worker node that joins it, each with
its own temp dir, declaring 2 CPUs, with Ray's token authentication on; an MLflow server beside
them. The job, submitted with `ray job submit`, asks for 2 vLLM engines and 2 ZeRO-3 workers of
2 CPUs each, so no node can hold two of either: Ray must place one on each node. Where each
actor ran comes from Ray's state API (`ray list actors`, with the cluster's token), after the job.

The run's storage_uri is a bucket on a real S3 API (moto's server on loopback), so nothing
depends on the driver's disk: pi_1, trained in iteration 1 and uploaded by rank 0, reaches
iteration 2's engines and train workers on both nodes through S3, each node downloading it
into its own model cache (separate SPPO_CACHE directories: the nodes share this machine's disk,
so that is what tells their copies apart).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections import Counter

import psutil
import pytest

from sppo.devtools.localstack import LocalStack, free_port
from sppo.manifest import STAGES
from tests.live_stack import (REPO, VENV_BIN, assert_one_finished_iteration_and_nothing_redone, client_env,
                              nested_runs, rest, submit, submit_command, wait_for_a_training_step)
from tests.processes import process_trees, wait_for_titled, wait_gone
from tests.test_shared_storage import remote_files

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

NODE_CPUS = 2
# Two iterations (the second reads pi_1 from storage), few prompts, short answers, no held-out
# evaluation; each engine and worker needs a whole node's CPUs, so the engines restart per stage
# (kept ones would leave no CPU for training): each iteration starts them anew, on both nodes.
ITERATIONS = 2
RUN_ARGS = (
    "--iters", str(ITERATIONS),
    "--set", "prompts.per_iteration=16", "--set", "sampling.max_tokens=16", "--set", "prompts.eval_size=0",
    "--set", "sampling.num_engines=2", "--set", f"sampling.cpus_per_engine={NODE_CPUS}",
    "--set", "sampling.engine_mode=restart",
    "--set", "train.num_workers=2", "--set", f"train.cpus_per_worker={NODE_CPUS}",
)
# Ray starts its workers at nice 15. Both nodes share this machine's 2 cores with the test
# session, and here both engines' vLLM workers bind to the same core (vLLM keeps the other for
# itself): at nice 15 behind any other busy process they starved past the 900 s sampling timeout.
JOB_ENV = {"RAY_worker_niceness": "0"}


@pytest.fixture
def two_node_stack(tmp_path_factory, request):
    """A Ray head and one worker node (NODE_CPUS each, token auth, the worker node with its own
    model cache) and an MLflow server. Afterwards, pass or fail, every process they started, and
    every child of those, is gone; the nodes' Ray temp dirs (every node's logs) are removed,
    unless the test failed: then they are kept, and named in the test's output."""
    stack = LocalStack(tmp_path_factory.mktemp("two-node"), ray_port=free_port(), dashboard_port=free_port(),
                       mlflow_port=free_port(), num_cpus=NODE_CPUS)
    started: list[psutil.Process] = []
    try:
        stack.start()
        stack.worker_cache = stack.state_dir / "worker-node-cache"
        stack.add_worker_node(num_cpus=NODE_CPUS, env={"SPPO_CACHE": str(stack.worker_cache)})
        yield stack
    finally:
        started = process_trees({pid for pids in stack.pids.values() for pid in pids})
        node_dirs = [str(d) for d in stack.temp_dirs()]  # the worker nodes' too, those a test added
        stack.stop()
    assert started and not wait_gone(started, timeout_s=30)
    strays = [p.pid for p in psutil.process_iter(["cmdline"])
              if any(d in " ".join(p.info["cmdline"] or []) for d in node_dirs)]
    assert not strays, f"processes of this test's Ray nodes outlived `stop`: {strays}"
    if getattr(request.node, "failed_call", False):
        print(f"the Ray nodes' logs are kept in {', '.join(node_dirs)}")
        return
    for temp_dir in node_dirs:  # outside pytest's tmp_path
        shutil.rmtree(temp_dir, ignore_errors=True)


def _ray_state(stack: LocalStack, resource: str, *filters: str,
               auth_mode: str = "token") -> subprocess.CompletedProcess:
    """`ray list <resource>` against the stack's dashboard, as an operator would run it."""
    cmd = [str(VENV_BIN / "ray"), "list", resource, "--address", stack.dashboard_url, "--detail",
           "--format", "json", "--limit", "1000"]
    for spec in filters:
        cmd += ["--filter", spec]
    env = client_env(stack, RAY_AUTH_MODE=auth_mode)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def _listed(stack: LocalStack, resource: str, *filters: str) -> list[dict]:
    done = _ray_state(stack, resource, *filters)
    assert done.returncode == 0, f"ray list {resource} failed:\n{done.stderr[-4000:]}"
    return json.loads(done.stdout)


def test_a_run_in_s3_storage_spreads_engines_and_training_workers_over_two_nodes(two_node_stack, s3_server,
                                                                                 tmp_path, monkeypatch):
    stack = two_node_stack
    nodes = [n for n in _listed(stack, "nodes") if n["state"] == "ALIVE"]
    assert len(nodes) == 2 and sorted(n["is_head_node"] for n in nodes) == [False, True]
    assert all(n["resources_total"]["CPU"] == NODE_CPUS for n in nodes)
    node_ids = {n["node_id"] for n in nodes}
    # The state API is behind the cluster's token: without it the same query is refused.
    refused = _ray_state(stack, "nodes", auth_mode="disabled")
    assert refused.returncode != 0, "the dashboard answered a state query without the token"

    # `--plan` sees both nodes and finds that each stage fits only when spread over them.
    plan = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "sppo.run", "--plan", "--config", "configs/tiny.yaml", *RUN_ARGS,
         "--output-dir", str(tmp_path / "planned")],  # not the repo's outputs/tiny, which a demo may have made
        env=client_env(stack, RAY_ADDRESS=f"127.0.0.1:{stack.ray_port}", MLFLOW_TRACKING_URI=stack.mlflow_url),
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert f"Cluster: 2 node(s), {2 * NODE_CPUS} CPU" in plan.stdout

    output_dir = tmp_path / "run"
    storage_uri = f"{s3_server.create_bucket('two-node')}/runs/tiny"
    job = submit(stack, output_dir, *RUN_ARGS, "--set", f"storage_uri={storage_uri}",
                 job_env={**JOB_ENV, **s3_server.env})
    assert "SPPO finished" in job.stdout

    # Where each actor of the job ran (dead actors keep their node id).
    [submitted] = [j for j in _listed(stack, "jobs") if j["type"] == "SUBMISSION"]
    assert submitted["status"] == "SUCCEEDED" and str(output_dir) in submitted["entrypoint"]
    actors = _listed(stack, "actors", f"job_id={submitted['job_id']}")
    placed: dict[str, Counter] = {}
    for actor in actors:
        placed.setdefault(actor["class_name"], Counter())[actor["node_id"]] += 1
    assert placed.get("VLLMEngine") == Counter(dict.fromkeys(node_ids, ITERATIONS)), placed
    assert placed.get("RayTrainWorker") == Counter(dict.fromkeys(node_ids, ITERATIONS)), placed

    # The run finished: every stage of both iterations is done, its MLflow runs are FINISHED.
    manifest = json.loads((output_dir / "manifest.json").read_text())
    for t in range(1, ITERATIONS + 1):
        stages = manifest["iterations"][str(t)]["stages"]
        assert set(stages) == set(STAGES), stages  # evaluation too: done, with no held-out prompts
        assert all(s["status"] == "done" for s in stages.values()), stages
    record = json.loads((output_dir / "run.json").read_text())
    assert rest(stack, "runs/get", {"run_id": record["parent_run_id"]})["run"]["info"]["status"] == "FINISHED"
    runs = nested_runs(stack, record["experiment_id"], record["parent_run_id"])
    assert sorted(runs) == ["iter-1", "iter-2"] and all(r["info"]["status"] == "FINISHED" for r in runs.values())
    # Each node's use reached the parent run, named by node: the worker node's engine and
    # training worker included, not only the driver's machine.
    assert placed.get("NodeMetricsMonitor") == Counter(dict.fromkeys(node_ids, 1)), placed
    parent_metrics = {m["key"] for m in rest(stack, "runs/get", {"run_id": record["parent_run_id"]})
                      ["run"]["data"]["metrics"]}
    watched = {key.split("/")[1].rsplit("-", 1)[1] for key in parent_metrics
               if key.endswith("/cpu_utilization_percentage") and key.count("/") == 2}
    assert watched == {node_id[:8] for node_id in node_ids}, parent_metrics

    # The storage holds the whole run, byte for byte what the driver kept: stage outputs,
    # metrics, manifest and both checkpoints (uploaded by rank 0 wherever it ran).
    local = {p.relative_to(output_dir).as_posix(): p.read_bytes() for p in output_dir.rglob("*")
             if p.is_file() and not any(part.startswith(".") for part in p.relative_to(output_dir).parts)}
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    stored = remote_files(storage_uri)
    stored = {name: data for name, data in stored.items() if "/ray_train/" not in name}  # Ray Train's own
    assert stored == local
    for t in range(1, ITERATIONS + 1):
        assert {f"iter-{t}/{name}" for name in ("samples.parquet", "judgments.parquet", "pairs.parquet",
                                                 "train_history.json", "checkpoint/config.json",
                                                 "checkpoint/model.safetensors")} <= set(stored)
    # Iteration 2's engine and train worker on the worker node loaded pi_1 from S3, into that
    # node's own cache; the job's workers were given its storage URI, never a driver path.
    [fetched] = (stack.worker_cache / "models").glob("iter-1-checkpoint-*")
    assert (fetched / "model.safetensors").read_bytes() == stored["iter-1/checkpoint/model.safetensors"]
    assert f"on {storage_uri}/iter-1/checkpoint" in job.stdout



NODE_LOST_S = 10
# The run above without S3, one iteration, and 10 epochs (20 optimizer steps) so that a kill lands
# in training.
LOST_NODE_ARGS = (*RUN_ARGS, "--iters", "1", "--set", "train.epochs=10",
                  "--set", f"timeouts.node_lost_s={NODE_LOST_S}")


def _worker_node_processes(stack: LocalStack) -> list[psutil.Process]:
    """Every process of the newest worker node: its daemons (raylet, agents) and their children."""
    latest = max((name for name in stack.pids if name.startswith("ray-worker-")), key=lambda n: int(n.rsplit("-", 1)[1]))
    return process_trees(stack.pids[latest])


def _lose_the_worker_node(stack: LocalStack, job: subprocess.Popen, stage: str) -> str:
    """SIGKILL every process of the worker node, as a reclaimed spot instance goes; returns the
    job's log once it has failed, which must be within the node-loss limit and Ray's detection."""
    procs = _worker_node_processes(stack)
    for proc in procs:
        proc.kill()
    killed = time.monotonic()
    assert not wait_gone(procs, timeout_s=30)
    log, _ = job.communicate(timeout=600)
    failed_in = time.monotonic() - killed
    assert job.returncode != 0, log[-4000:]
    assert f"error: stage '{stage}': Ray node " in log, log[-4000:]
    assert "submit the same command again to continue" in log
    assert failed_in < NODE_LOST_S + 120, failed_in
    print(f"{stage}: the job failed {failed_in:.0f} s after the worker node was lost")
    return log


@pytest.mark.cluster_faults
def test_a_lost_node_fails_the_stage_naming_it_and_a_resubmission_continues(two_node_stack, tmp_path):
    """The worker node SIGKILLed, raylet and all, (a) while a vLLM engine on it starts or samples
    and (b) while a training worker on it trains. Each engine and worker needs a whole node's
    CPUs, so what ran there cannot be placed on the head: the stage fails timeouts.node_lost_s
    after Ray notices, naming the node. With a new worker node, a re-submission redoes nothing
    that was published and finishes with one MLflow run per iteration."""
    stack = two_node_stack
    out = tmp_path / "run"
    cmd, env = submit_command(stack, out, *LOST_NODE_ARGS, job_env=JOB_ENV)

    job = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_titled([p.pid for p in _worker_node_processes(stack)], "ray::VLLMEngine", lambda: job.poll() is None)
        _lose_the_worker_node(stack, job, "sampling")
    finally:
        if job.poll() is None:
            job.kill()
    assert not (out / "iter-1" / "samples.parquet").exists()

    stack.add_worker_node(num_cpus=NODE_CPUS)
    job = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_a_training_step(stack, out, job)
        _lose_the_worker_node(stack, job, "training")
    finally:
        if job.poll() is None:
            job.kill()
    published = json.loads((out / "manifest.json").read_text())["iterations"]["1"]["stages"]
    assert set(published) == {"sampling", "judging", "pairs"}

    stack.add_worker_node(num_cpus=NODE_CPUS)
    again = submit(stack, out, *LOST_NODE_ARGS, job_env=JOB_ENV)
    assert "SPPO finished" in again.stdout
    assert_one_finished_iteration_and_nothing_redone(stack, out, published)


@pytest.mark.cluster_faults
def test_a_lost_judge_node_fails_judging_naming_it_and_a_resubmission_continues(two_node_stack, tmp_path):
    """The judge on a worker node that is SIGKILLed, raylet and all, while the judge starts or
    judges. The judge needs 3 CPUs, which only that node (joined for this test) declares, so Ray
    cannot restart it elsewhere: judging fails timeouts.node_lost_s after Ray notices, naming
    the node. With a new such node, a re-submission keeps the samples and finishes."""
    stack = two_node_stack
    judge_cpus = NODE_CPUS + 1
    stack.add_worker_node(num_cpus=judge_cpus)
    out = tmp_path / "run"
    args = (*LOST_NODE_ARGS, "--set", "judge.kind=pairrm", "--set", "judge.path=tiny:pairrm",
            "--set", f"judge.num_cpus={judge_cpus}", "--set", "train.epochs=1")
    cmd, env = submit_command(stack, out, *args, job_env=JOB_ENV)
    job = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_titled([p.pid for p in _worker_node_processes(stack)], "ray::PairRMJudgeActor",
                        lambda: job.poll() is None)
        _lose_the_worker_node(stack, job, "judging")
    finally:
        if job.poll() is None:
            job.kill()
    published = json.loads((out / "manifest.json").read_text())["iterations"]["1"]["stages"]
    assert set(published) == {"sampling"}

    stack.add_worker_node(num_cpus=judge_cpus)
    again = submit(stack, out, *args, job_env=JOB_ENV)
    assert "SPPO finished" in again.stdout and "iteration 1: running judging, pairs, training, evaluation, tracking (the manifest vouches" in again.stdout
    assert json.loads((out / "manifest.json").read_text())["iterations"]["1"]["stages"]["sampling"] == published["sampling"]
