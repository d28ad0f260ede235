"""`python -m sppo.run --plan`: the per-stage resource plan and its fit against a cluster."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sppo import plan
from sppo.config import load_config
from sppo.devtools.localstack import free_port
from sppo.plan import (BAD_INPUT, DOES_NOT_FIT, FITS, NOTHING_TO_CHECK, check_fit, cluster_nodes, config_problems,
                       format_plan, parse_node, placeable, plan_main, resource_plan)
from sppo.run import build_parser, main
from tests.fake_hub import fake_hub

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = sorted(p.name for p in (REPO / "configs").glob("*-sppo.yaml"))


def config(name: str, **overrides):
    return load_config(REPO / "configs" / name, overrides)


def test_plan_reads_each_stage_from_the_config():
    sampling, judging, training = (s.role for s in resource_plan(config("gemma-2-9b-it-sppo.yaml")))
    assert (sampling.stage, sampling.count, sampling.cpus, sampling.gpus) == ("sampling", 8, 4.0, 1.0)
    assert (judging.stage, judging.count, judging.cpus, judging.gpus) == ("judging", 1, 4.0, 1.0)
    assert (training.stage, training.count, training.cpus, training.gpus) == ("training", 8, 4.0, 1.0)
    tiny = resource_plan(config("tiny.yaml"))
    assert [(s.role.count, s.role.cpus, s.role.gpus) for s in tiny] == [(1, 1.0, 0.0), (1, 1.0, 0.0), (2, 1.0, 0.0)]
    # The judging role is the configured judge's.
    assert (judging.name, tiny[1].role.name) == ("PairRM judge", "rule judge")
    reward = resource_plan(config("tiny.yaml", **{"judge.kind": "reward_model", "judge.path": "tiny:reward"}))
    assert reward[1].role.name == "reward-model judge"
    # The restarts and timeouts the stages run with are the same role's.
    assert (sampling.restarts, training.restarts, training.timeout_s) == (1, 1, 48 * 3600.0)


@pytest.mark.parametrize("name", PRODUCTION)
@pytest.mark.parametrize("layout", ["CPU=64,GPU=8", "2x CPU=64,GPU=8"])
def test_production_configs_fit_one_and_two_nodes_of_8_gpus(name, layout):
    cfg = config(name)
    assert config_problems(cfg) == []
    assert check_fit(resource_plan(cfg), parse_node(layout)) == []


def test_an_evaluation_judge_of_its_own_is_a_stage_of_the_plan():
    # The default: evaluation grades with the training judge, which the judging stage already holds.
    assert [s.role.stage for s in resource_plan(config("gemma-2-9b-it-sppo.yaml"))] == ["sampling", "judging",
                                                                                         "training"]
    same = config("gemma-2-9b-it-sppo.yaml", **{"eval.judge": config("gemma-2-9b-it-sppo.yaml").judge.model_dump()})
    assert len(resource_plan(same)) == 3
    cfg = config("gemma-2-9b-it-sppo.yaml", **{"eval.judge.kind": "reward_model",
                                               "eval.judge.path": "RLHFlow/ArmoRM-Llama3-8B-v0.1",
                                               "eval.judge.num_gpus": 1, "eval.judge.num_cpus": 4})
    evaluation = resource_plan(cfg)[3]
    role = evaluation.role
    assert (role.stage, role.name, role.gpus) == ("evaluation", "reward-model judge", 1.0)
    lines = format_plan(cfg, resource_plan(cfg), None).splitlines()
    assert any(line.split()[:5] == ["evaluation", "1", "x", "reward-model", "judge"] for line in lines), lines
    assert check_fit(resource_plan(cfg), parse_node("CPU=64,GPU=8")) == []
    [problem] = check_fit(resource_plan(config("tiny.yaml", **{"eval.judge.kind": "rule", "eval.judge.num_cpus": 3})),
                          parse_node("CPU=3"))
    assert problem.startswith("stage 'evaluation' does not fit") and "eval.judge.num_cpus=3" in problem


def test_a_stage_that_does_not_fit_is_named_with_its_config_fields():
    problems = check_fit(resource_plan(config("gemma-2-9b-it-sppo.yaml")), parse_node("CPU=64,GPU=4"))
    assert len(problems) == 2
    assert problems[0].startswith("stage 'sampling' does not fit") and "sampling.num_engines=8" in problems[0]
    assert "sampling.gpus_per_engine=1" in problems[0] and "can place 4" in problems[0]
    assert problems[1].startswith("stage 'training' does not fit") and "train.num_workers=8" in problems[1]
    judge_cpus = check_fit(resource_plan(config("tiny.yaml", **{"judge.num_cpus": 3})), parse_node("CPU=3"))
    assert len(judge_cpus) == 1 and "stage 'judging'" in judge_cpus[0] and "judge.num_cpus=3" in judge_cpus[0]


def test_actors_must_fit_on_one_node_not_only_in_the_cluster_total():
    # Four TP=2 engines need 8 GPUs; three nodes of 3 GPUs have 9 but hold only one engine each.
    cfg = config("gemma-2-9b-it-sppo.yaml", **{"sampling.num_engines": 4, "sampling.gpus_per_engine": 2,
                                               "sampling.tensor_parallel_size": 2})
    sampling = resource_plan(cfg)[0]
    assert placeable(sampling.role, {"CPU": 64, "GPU": 3}) == 1
    problems = check_fit([sampling], parse_node("3x CPU=64,GPU=3"))
    assert len(problems) == 1 and "can place 3 (9 GPU over 3 node(s), at most 3 on one)" in problems[0]
    assert check_fit([sampling], parse_node("2x CPU=64,GPU=4")) == []


def test_fractional_demands_and_cpu_only_stages():
    cfg = config("tiny.yaml", **{"sampling.num_engines": 4, "sampling.cpus_per_engine": 0.5})
    sampling = resource_plan(cfg)[0].role
    assert placeable(sampling, {"CPU": 2.0}) == 4 and placeable(sampling, {"CPU": 1.9}) == 3
    assert placeable(sampling, {"GPU": 8.0}) == 0  # it asks for CPUs, and this node has none
    assert check_fit(resource_plan(config("tiny.yaml")), [{"CPU": 3.0}]) == []


def test_kept_engines_hold_their_resources_while_later_stages_run():
    # tiny: one resident engine (1 CPU) stays through training (2 workers x 1 CPU).
    kept = resource_plan(config("tiny.yaml"))
    assert kept[0].kept and not kept[1].kept and not kept[2].kept
    [problem] = check_fit(kept, parse_node("CPU=2"))
    assert problem.startswith("stage 'training' does not fit") and "can place 1" in problem
    assert "beside the kept vLLM engines: sampling.cpus_per_engine=1" in problem
    assert "sampling.engine_mode=restart" in problem
    assert check_fit(resource_plan(config("tiny.yaml", **{"sampling.engine_mode": "restart"})), parse_node("CPU=2")) == []
    # Two nodes: the engine takes one CPU of the first, training still fits over both.
    assert check_fit(kept, parse_node("2x CPU=2")) == []


def test_the_one_gpu_lora_config_fits_one_gpu_with_its_engine_asleep_beside_the_trainer():
    """configs/gemma-2-9b-it-sppo-lora.yaml: the kept engine (sleep), the judge and the trainer
    each reserve half the GPU, so the engine stays for the whole job on 16 CPUs and 1 GPU."""
    cfg = config("gemma-2-9b-it-sppo-lora.yaml")
    stages = resource_plan(cfg)
    assert [(s.role.count, s.role.gpus, s.kept) for s in stages] == [(1, 0.5, True), (1, 0.5, False), (1, 0.5, False)]
    assert config_problems(cfg) == [] and check_fit(stages, parse_node("1x CPU=16,GPU=1")) == []
    assert plan_main(cfg, ["1x CPU=16,GPU=1"]) == FITS
    # A whole GPU for the trainer leaves none beside the sleeping engine: named by its field.
    whole = config("gemma-2-9b-it-sppo-lora.yaml", **{"train.gpus_per_worker": None})
    [problem] = check_fit(resource_plan(whole), parse_node("1x CPU=16,GPU=1"))
    assert problem.startswith("stage 'training' does not fit") and "train.use_gpu=true" in problem
    [problem] = check_fit(resource_plan(config("gemma-2-9b-it-sppo-lora.yaml", **{"train.gpus_per_worker": 0.75})),
                          parse_node("1x CPU=16,GPU=1"))
    assert "train.gpus_per_worker=0.75" in problem and "beside the kept vLLM engines" in problem


def test_tensor_parallel_engines_need_as_many_gpus():
    cfg = config("gemma-2-9b-it-sppo.yaml", **{"sampling.tensor_parallel_size": 2})
    problems = config_problems(cfg)
    assert len(problems) == 1 and "sampling.tensor_parallel_size=2" in problems[0]
    assert "sampling.gpus_per_engine=1" in problems[0]


def test_node_descriptions():
    assert parse_node("CPU=96, GPU=8") == [{"CPU": 96.0, "GPU": 8.0}]
    assert parse_node("3x CPU=8") == [{"CPU": 8.0}] * 3
    for bad in ("CPU", "CPU=lots", "0x CPU=1", "", "GPU=-1"):
        with pytest.raises(ValueError, match="expected \\[Nx\\] RESOURCE=AMOUNT"):
            parse_node(bad)


def run_plan(*args: str) -> subprocess.CompletedProcess:
    """--plan runs the run's checks too: on the bundled prompts, which it reads and counts (a hub
    dataset it lists as not checked; the bundled set has no test split to hold out); the tracking
    store is a sqlite file never created."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tempfile.gettempdir()}/sppo-plan-unused.db"}
    return subprocess.run([sys.executable, "-m", "sppo.run", "--plan", "--set", "prompts.source=builtin:tiny",
                           "--set", "prompts.eval_split=null", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def test_cli_prints_the_plan_and_exits_by_fit(tmp_path):
    out = tmp_path / "never-created"
    fits = run_plan("--config", "configs/gemma-2-9b-it-sppo.yaml", "--node", "2x CPU=64,GPU=8",
                    "--output-dir", str(out))
    assert fits.returncode == 0, fits.stderr
    assert re.search(r"sampling +8 x vLLM engine +4 CPU +1 GPU each", fits.stdout) and "The plan fits" in fits.stdout
    assert "Cluster: 2 node(s), 128 CPU, 16 GPU" in fits.stdout
    short = run_plan("--config", "configs/gemma-2-9b-it-sppo.yaml", "--node", "CPU=64,GPU=4",
                     "--output-dir", str(out))
    assert short.returncode == 1 and "stage 'sampling' does not fit" in short.stderr
    bad = run_plan("--config", "configs/tiny.yaml", "--node", "GPU=lots", "--output-dir", str(out))
    assert bad.returncode == 2 and "--node 'GPU=lots'" in bad.stderr
    assert not out.exists()  # --plan runs nothing and writes nothing


def test_exit_statuses_by_fit_input_and_what_was_checked(monkeypatch, capsys):
    def no_cluster():
        raise ConnectionError("no running Ray cluster to check the plan against")

    monkeypatch.setattr(plan, "cluster_nodes", no_cluster)
    cfg = config("tiny.yaml")
    assert plan_main(cfg, []) == NOTHING_TO_CHECK == 3
    assert plan_main(cfg, ["CPU=3"]) == FITS == 0
    assert plan_main(cfg, ["CPU=3"], ["output_dir: /shared/x is not on this machine"]) == FITS
    assert plan_main(cfg, ["CPU=3"], ["output_dir: /shared/x is not on this machine"], strict=True) == NOTHING_TO_CHECK
    assert plan_main(cfg, ["CPU=1"], ["output_dir: /shared/x is not on this machine"], strict=True) == DOES_NOT_FIT
    assert plan_main(cfg, ["CPU=lots"]) == BAD_INPUT == 2
    assert capsys.readouterr().out.count("not checked here: output_dir: /shared/x") == 3
    documented = " ".join(build_parser().format_help().split())
    assert "0 fits; 1 a stage does not fit; 2 bad input or a failed check; 3 nothing to check against" in documented


def test_off_the_cluster_it_plans_and_names_each_check_only_the_cluster_can_make(tmp_path):
    """The production config where neither the hub (a real connection error), its tracking server
    nor its output directory answer: the plan, one line per check not made, nothing downloaded;
    --strict counts them."""
    absent = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
    env.update(HF_ENDPOINT=absent, HF_HOME=str(tmp_path / "hf"), MLFLOW_TRACKING_URI=absent)
    out = f"/sppo-plan-test-{os.getpid()}/run"  # no directory of it exists here
    argv = [sys.executable, "-m", "sppo.run", "--plan", "--node", "1x CPU=96,GPU=8", "--config",
            "configs/gemma-2-9b-it-sppo.yaml", "--output-dir", out, "--resume-from", "2"]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "The plan fits" in done.stdout and "error" not in done.stderr
    unchecked = [line for line in done.stdout.splitlines() if line.startswith("not checked here: ")]
    assert len(unchecked) == 5, unchecked
    for expected in (f"output_dir: {out} is not on this machine",
                     "policy.path: google/gemma-2-9b-it on the Hugging Face hub",
                     "judge.path: llm-blender/PairRM on the Hugging Face hub",
                     "prompts.source hf:snorkelai/Snorkel-Mistral-PairRM-DPO-Dataset: a Hugging Face hub dataset",
                     f"MLFLOW_TRACKING_URI: MLflow tracking server {absent} is not reachable"):
        assert sum(expected in line for line in unchecked) == 1, expected
    assert "the hub does not answer here (ConnectError)" in unchecked[1]
    assert not any(path.is_file() for path in (tmp_path / "hf").rglob("*")) and not Path(out).parent.exists()

    strict = subprocess.run([*argv, "--strict"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**env, "HF_HUB_OFFLINE": "1"})
    assert strict.returncode == NOTHING_TO_CHECK, strict.stdout + strict.stderr
    assert "policy.path: google/gemma-2-9b-it on the Hugging Face hub (http" in strict.stdout
    assert "HF_HUB_OFFLINE is set here" in strict.stdout
    assert [line for line in strict.stderr.splitlines() if line.startswith("error:")] == [
        "error: --strict: 5 check(s) above were not made here; run --plan where the cluster's hub, tracking "
        "server and output directory answer (e.g. in a Ray job), or without --strict"]


def test_where_the_hub_answers_the_plan_checks_the_model(tmp_path, tmp_path_factory, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/never-created.db")
    monkeypatch.chdir(REPO)
    argv = ["--plan", "--config", "configs/tiny.yaml", "--node", "CPU=3", "--output-dir", str(tmp_path / "out")]
    with fake_hub(monkeypatch, tmp_path_factory.mktemp("hf")) as asked:
        assert main([*argv, "--set", "policy.path=org/found"]) == FITS
        assert "not checked here" not in capsys.readouterr().out
        assert main([*argv, "--set", "policy.path=org/broken"]) == FITS
        assert "not checked here: policy.path: org/broken on the Hugging Face hub" in capsys.readouterr().out
        assert main([*argv, "--strict", "--set", "policy.path=org/broken"]) == NOTHING_TO_CHECK
        assert main([*argv, "--set", "policy.path=org/missing"]) == BAD_INPUT
        assert "policy.path: the Hugging Face hub has no model org/missing" in capsys.readouterr().err
    assert [p for p in asked if p.startswith("/api/models/")] == [
        f"/api/models/org/{name}/auth-check" for name in ("found", "broken", "broken", "missing")]
    assert not (tmp_path / "out").exists() and not (tmp_path / "never-created.db").exists()


@pytest.mark.slow
def test_plan_against_the_running_cluster(ray_cluster):
    nodes = cluster_nodes()  # the fixture's cluster: one node with 3 CPUs
    assert len(nodes) == 1 and nodes[0]["CPU"] == 3.0
    assert ray_cluster.is_initialized()  # reading the cluster leaves the connection as it was
    assert check_fit(resource_plan(config("tiny.yaml")), nodes) == []
    problems = check_fit(resource_plan(config("tiny.yaml", **{"train.num_workers": 3})), nodes)
    assert len(problems) == 1 and "stage 'training'" in problems[0] and "train.num_workers=3" in problems[0]


def test_each_role_carries_what_its_stage_starts_and_waits_on():
    from sppo.roles import run_roles

    cfg = config("gemma-2-9b-it-sppo.yaml", **{"judge.max_restarts": 3, "timeouts.judging_s": 60,
                                               "timeouts.node_lost_s": 30})
    sampling, judging, training = run_roles(cfg)
    assert judging.actor_options() == {"num_cpus": 4.0, "num_gpus": 1.0, "max_restarts": 3, "max_task_retries": 3}
    assert (judging.timeout_s, judging.node_lost_s, judging.resources) == (60.0, 30.0, "num_cpus=4, num_gpus=1")
    assert (sampling.timeout_s, training.timeout_s) == (cfg.timeouts.sampling_s, cfg.timeouts.training_s)
    assert training.fields["restarts"] == "train.max_failures=1"
    # --plan checks exactly the roles the stages run with.
    assert [s.role for s in resource_plan(cfg)] == [sampling, judging, training]
