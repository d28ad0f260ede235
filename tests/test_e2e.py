"""End to end: the README's `make demo` on an empty home directory (a real Ray head and MLflow
server, the 3-iteration job submitted with `ray job submit`), then its resume.

Checks go through MLflow's REST API, as a user's tooling would see the record.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from sppo.evaluation import choose_champion
from sppo.manifest import content_hash
from tests.live_stack import assert_no_secrets, nested_runs, rest, submit

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


def test_three_iterations_then_resume(demo, tmp_path):
    stack, output_dir = demo.stack, demo.output_dir
    # The demo made its own Ray token in the empty home, readable by its owner only.
    token = demo.home / ".ray" / "auth_token"
    assert token.stat().st_mode & 0o077 == 0 and f"Ray: created a token for token auth in {token}" in demo.log
    # No process of the demo started MLflow's usage telemetry (it writes its installation id first).
    assert not list(demo.home.rglob("telemetry.json")), "MLflow telemetry ran in the demo"
    assert "SPPO finished" in demo.log and "MLflow runs:" in demo.log
    assert_no_secrets("the demo's output and job log", demo.log)
    # The job's log tells the story in our own lines; vLLM's, DeepSpeed's and torch's output is
    # in the actors' third-party logs beside Ray's worker logs, not streamed.
    job_log = demo.log[demo.log.index("=== iteration 1/3"):demo.log.index("SPPO finished")]
    for noise in ("Attempted to load weight", "FutureWarning", "deepspeed_shm_comm_op", "Processed prompts",
                  "Loading safetensors", "Initializing a V1 LLM engine"):
        assert noise not in job_log, noise
    for noise in ("mlflow.system_metrics", "View run", "Writing model shards"):  # the driver's own third parties
        assert noise not in job_log, noise
    assert len(job_log.splitlines()) <= 3 * 30, job_log  # a few dozen lines an iteration
    third_party = list((stack.ray_temp_dir / "session_latest" / "logs").glob("sppo-third-party-*.log"))
    assert any("Initializing a V1 LLM engine" in path.read_text() for path in third_party), third_party
    assert "engine_mode resident, dtype float32" in demo.log

    record = json.loads((output_dir / "run.json").read_text())
    parent = rest(stack, "runs/get", {"run_id": record["parent_run_id"]})["run"]
    assert parent["info"]["status"] == "FINISHED"
    runs = nested_runs(stack, record["experiment_id"], record["parent_run_id"])
    assert sorted(runs) == ["iter-1", "iter-2", "iter-3"]

    from mlflow.artifacts import download_artifacts
    from transformers import AutoModelForCausalLM

    for name, run in runs.items():
        run_id = run["info"]["run_id"]
        assert run["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["sampling.k"] == "4" and params["train.eta"] == "20.0"
        loss = rest(stack, "metrics/get-history", {"run_id": run_id, "metric_key": "train/loss"})["metrics"]
        assert loss and all(isinstance(m["value"], float) for m in loss)
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"sampling/candidates", "sampling/generated_tokens", "pairs/mean_chosen_win_prob",
                "pairs/mean_rejected_win_prob", "time/training_s"} <= metrics
        listed = rest(stack, "artifacts/list", {"run_id": run_id, "path": "data"})["files"]
        assert {"data/pairs.parquet", "data/judgments.parquet"} <= {f["path"] for f in listed}
        local = download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=str(tmp_path / name),
                                   tracking_uri=stack.mlflow_url)
        assert AutoModelForCausalLM.from_pretrained(local).num_parameters() > 0
        # The checkpoint went to MLflow with its model card.
        assert ModelCard.load(Path(local) / "README.md").data.model_name == f"sppo-tiny-{name.replace('-', '')}"
        # The sample table, the held-out judgments and the driver's system metrics.
        table = json.loads(Path(download_artifacts(run_id=run_id, artifact_path="samples.json",
                                                   dst_path=str(tmp_path / name),
                                                   tracking_uri=stack.mlflow_url)).read_text())
        assert table["columns"] == ["prompt", "candidates", "win_matrix", "chosen", "rejected"]
        assert len(table["data"]) == 48
        assert "data/eval_judgments.parquet" in {f["path"] for f in listed}
        assert any(key.startswith("system/cpu_utilization") for key in metrics)
    # Every node's use, in the parent run, named by node: here the one node.
    parent_metrics = {m["key"] for m in parent["data"]["metrics"]}
    nodes = {key.split("/")[1] for key in parent_metrics if key.endswith("/cpu_utilization_percentage")
             and key.count("/") == 2}
    assert len(nodes) == 1 and {f"system/{node}/system_memory_usage_megabytes" for node in nodes} <= parent_metrics

    # It learns: on held-out prompts pi_t beats pi_0 more often every iteration, and clearly by
    # the third; the parent run holds the same values as a series with step = iteration.
    vs_base = [next(m["value"] for m in runs[f"iter-{t}"]["data"]["metrics"] if m["key"] == "eval/win_rate_vs_base")
               for t in (1, 2, 3)]
    assert vs_base[0] < vs_base[1] < vs_base[2] and vs_base[2] >= 0.65, vs_base
    for t in (1, 2, 3):
        found = {m["key"]: m["value"] for m in runs[f"iter-{t}"]["data"]["metrics"]}
        assert found["eval/win_rate_vs_base_ci_low"] <= vs_base[t - 1] <= found["eval/win_rate_vs_base_ci_high"]
        assert {"eval/win_rate_vs_prev", "eval/mean_response_chars"} <= set(found)
    # One vLLM engine (sampling.num_engines=1) started for the whole job: every later sampling
    # and evaluation ran on it, loading pi_1, pi_2 and pi_3 in place, one load an iteration.
    found = {t: {m["key"]: m["value"] for m in runs[f"iter-{t}"]["data"]["metrics"]} for t in (1, 2, 3)}
    starts = [found[t]["sampling/engine_starts"] + found[t]["evaluation/engine_starts"] for t in (1, 2, 3)]
    assert starts == [1, 0, 0], starts
    # Evaluation loaded pi_t; iteration t+1 sampled from it without another load.
    assert all(found[t]["time/sampling/weights_load_s"] == 0 for t in (1, 2, 3))
    assert demo.log.count("sampling: starting 1 vLLM engine(s)") == 1
    loads = re.findall(r"sampling: vLLM engine\(s\) loaded (\S+) in", demo.log)
    assert loads == [str(output_dir / f"iter-{t}" / "checkpoint") for t in (1, 2, 3)], loads
    series = rest(stack, "metrics/get-history", {"run_id": record["parent_run_id"],
                                                 "metric_key": "eval/win_rate_vs_base"})["metrics"]
    assert sorted((m["step"], m["value"]) for m in series) == list(zip((1, 2, 3), vs_base))
    # Each iteration's checkpoint is a version of the registered model, in order, described by
    # its card and tagged with its win rates.
    versions = rest(stack, "model-versions/search", {"filter": "name = 'sppo-tiny'"})["model_versions"]
    by_run = {v["run_id"]: v for v in versions}
    for t in (1, 2, 3):
        version = by_run[runs[f"iter-{t}"]["info"]["run_id"]]
        assert version["source"].endswith("/checkpoint")
        assert version["description"].startswith(f"Iteration {t} of 3 of SPPO")
        tags = {tag["key"]: tag["value"] for tag in version["tags"]}
        assert float(tags["win_rate_vs_base"]) == pytest.approx(vs_base[t - 1], abs=1e-4)

    # Length control: every iteration logs its length-controlled win rates and both policies'
    # lengths; the registered model's `champion` is the version of the iteration the rule picks,
    # and the cards and the demo's report say which and why.
    for t in (1, 2, 3):
        assert {"eval/lc_win_rate_vs_base", "eval/lc_win_rate_vs_base_ci_low", "eval/lc_win_rate_vs_prev",
                "eval/length_coef_vs_base", "eval/mean_response_tokens", "eval/base_mean_response_chars",
                "eval/base_mean_response_tokens"} <= set(found[t])
    champion = choose_champion(found)
    assert champion_version(stack, "sppo-tiny") == (
        by_run[runs[f"iter-{champion.iteration}"]["info"]["run_id"]]["version"] if champion.iteration else None)
    assert f"champion: {champion.reason}" in demo.log and "LC win rate vs base [95% CI]" in demo.log

    # iter-3's card lists iterations 1-3 with the run's values, the champion marked; the export loads as it is.
    card = ModelCard.load(output_dir / "iter-3" / "checkpoint" / "README.md")
    for t in (1, 2, 3):
        row = next(line for line in card.text.splitlines() if line.startswith(f"| {t} "))
        assert f"| {found[t]['eval/lc_win_rate_vs_base']:.3f} [" in row and f"| {vs_base[t - 1]:.3f} [" in row
        assert row.startswith(f"| {t} (champion) |") == (t == champion.iteration)
    assert champion.reason in card.text
    results = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert results["win_rate_vs_base"] == pytest.approx(vs_base[2], abs=1e-4)
    assert results["lc_win_rate_vs_base"] == pytest.approx(found[3]["eval/lc_win_rate_vs_base"], abs=1e-4)
    assert card.data.base_model == "tiny:policy" and "- num_devices: 2" in card.text
    exported = subprocess.run([sys.executable, "-m", "sppo.export", "--output-dir", str(output_dir), "--iteration",
                               "3", "--to", str(tmp_path / "export")], capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "export").num_parameters() > 0
    published = output_dir / "iter-3" / "checkpoint" / "README.md"
    assert (tmp_path / "export" / "README.md").read_text() == published.read_text()

    # Re-submitting the finished job redoes nothing; --resume-from 3 redoes only iteration 3.
    submit(stack, output_dir, "--iters", "3")
    assert {n: r["info"]["run_id"] for n, r in nested_runs(stack, record["experiment_id"],
                                                            record["parent_run_id"]).items()} == \
        {n: r["info"]["run_id"] for n, r in runs.items()}

    submit(stack, output_dir, "--iters", "3", "--resume-from", "3")
    after = nested_runs(stack, record["experiment_id"], record["parent_run_id"])
    assert sorted(after) == ["iter-1", "iter-2", "iter-3"]
    assert after["iter-1"]["info"]["run_id"] == runs["iter-1"]["info"]["run_id"]
    assert after["iter-2"]["info"]["run_id"] == runs["iter-2"]["info"]["run_id"]
    assert after["iter-3"]["info"]["run_id"] != runs["iter-3"]["info"]["run_id"]
    assert after["iter-3"]["info"]["status"] == "FINISHED"
    # Iterations 1 and 2 keep their values; the redone iteration 3 has its own, and the champion
    # alias follows the rule on them (iteration 3's old version no longer counts).
    redone = {t: {m["key"]: m["value"] for m in after[f"iter-{t}"]["data"]["metrics"]} for t in (1, 2, 3)}
    assert all(redone[t][key] == found[t][key] for t in (1, 2) for key in found[t] if key.startswith("eval/"))
    for key in ("eval/base_mean_response_chars", "eval/base_mean_response_tokens", "eval/prev_mean_response_chars"):
        assert redone[3][key] == found[3][key]  # pi_0's and pi_2's held-out samples are reused as they were
    champion = choose_champion(redone)
    versions = rest(stack, "model-versions/search", {"filter": "name = 'sppo-tiny'"})["model_versions"]
    by_run = {v["run_id"]: v for v in versions}
    assert champion_version(stack, "sppo-tiny") == (
        by_run[after[f"iter-{champion.iteration}"]["info"]["run_id"]]["version"] if champion.iteration else None)
    assert rest(stack, "runs/get", {"run_id": record["parent_run_id"]})["run"]["info"]["status"] == "FINISHED"
    assert (output_dir / "iter-3" / "checkpoint" / "config.json").exists()
    assert (output_dir / "iter-3.superseded-1" / "checkpoint" / "config.json").exists()

    # The MLflow store (database and artifacts) and the output directory hold no planted secret.
    for root in (stack.state_dir / "mlflow", output_dir):
        for path in root.rglob("*"):
            if path.is_file():
                assert_no_secrets(str(path), path.read_bytes().decode("latin-1"))



def champion_version(stack, model: str) -> str | None:
    """The version the registered model's alias `champion` points at, if any."""
    aliases = rest(stack, "registered-models/get", {"name": model})["registered_model"].get("aliases", [])
    return next((a["version"] for a in aliases if a["alias"] == "champion"), None)


def test_an_evaluation_judge_apart_from_a_training_judge_that_pays_for_length(live_stack, tmp_path):
    """A 2-iteration tiny job whose training judge pays for length as well as letters, graded too by
    `eval.judge`, the letters rule alone: both judges' raw and length-controlled win rates and both
    policies' lengths are logged every iteration, the champion alias follows the rule, and the model
    card's table shows it."""
    out = tmp_path / "length"
    settings = ("--iters", "2", "--set", "judge.rule.weights={letters: 1.0, length: 5.0}", "--set", "eval.judge.kind=rule",
                "--set", "tracking.experiment=sppo-tiny-length", "--set", "tracking.register_model=sppo-tiny-length")
    done = submit(live_stack, out, *settings, "--set", "eval.bootstrap_samples=200")
    record = json.loads((out / "run.json").read_text())
    runs = nested_runs(live_stack, record["experiment_id"], record["parent_run_id"])
    found = {t: {m["key"]: m["value"] for m in runs[f"iter-{t}"]["data"]["metrics"]} for t in (1, 2)}
    for t in (1, 2):
        for judge in ("eval/", "eval/training_judge/"):
            for name in ("win_rate_vs_base", "lc_win_rate_vs_base", "win_rate_vs_prev", "lc_win_rate_vs_prev"):
                assert {f"{judge}{name}", f"{judge}{name}_ci_low", f"{judge}{name}_ci_high"} <= set(found[t]), name
        for policy in ("", "base_", "prev_"):
            assert {f"eval/{policy}mean_response_chars", f"eval/{policy}mean_response_tokens"} <= set(found[t])
    params = {p["key"]: p["value"] for p in runs["iter-1"]["data"]["params"]}
    assert (params["eval.judge.kind"], params["judge.rule.weights.length"]) == ("rule", "5.0")

    champion = choose_champion(found)
    versions = rest(live_stack, "model-versions/search", {"filter": "name = 'sppo-tiny-length'"})["model_versions"]
    by_run = {v["run_id"]: v["version"] for v in versions}
    expected = by_run[runs[f"iter-{champion.iteration}"]["info"]["run_id"]] if champion.iteration else None
    assert champion_version(live_stack, "sppo-tiny-length") == expected
    assert f"iteration 2: champion: " in done.stdout and champion.reason in done.stdout
    card = (out / "iter-2" / "checkpoint" / "README.md").read_text()
    assert champion.reason in card and "By the training judge, a rule judge (letters 1, length 5)" in card
    assert "judged by a rule judge (letters 1)," in card

    # Re-graded with another eval field: each iteration's evaluation and tracking run again in a
    # replacing nested run, on the held-out samples already drawn; nothing is sampled, judged or
    # trained again, and the checkpoints stay as they were.
    checkpoints = {t: content_hash(out / f"iter-{t}" / "checkpoint", ("README.md",)) for t in (1, 2)}
    again = submit(live_stack, out, *settings, "--set", "eval.bootstrap_samples=100")
    for t in (1, 2):
        assert f"iteration {t}: running evaluation, tracking (the manifest vouches" in again.stdout
        assert not any(f"iteration {t}: {stage} ..." in again.stdout for stage in ("sampling", "judging", "training"))
        assert f"iteration {t}: evaluation done" in again.stdout
    assert {t: content_hash(out / f"iter-{t}" / "checkpoint", ("README.md",)) for t in (1, 2)} == checkpoints
    regraded = nested_runs(live_stack, record["experiment_id"], record["parent_run_id"])
    assert sorted(regraded) == ["iter-1", "iter-2"]
    for t in (1, 2):
        run = regraded[f"iter-{t}"]
        assert run["info"]["status"] == "FINISHED" and run["info"]["run_id"] != runs[f"iter-{t}"]["info"]["run_id"]
        metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["eval.bootstrap_samples"] == "100"
        assert metrics["eval/win_rate_vs_base"] == found[t]["eval/win_rate_vs_base"]  # the same samples, judged alike
        assert metrics["train/final_loss"] == found[t]["train/final_loss"]  # replayed, not retrained
    for t in (1, 2):
        row = next(line for line in card.splitlines() if line.startswith(f"| {t} "))
        assert f"| {found[t]['eval/lc_win_rate_vs_base']:.3f} [" in row
        assert f"| {found[t]['eval/mean_response_chars']:.0f} ({found[t]['eval/mean_response_tokens']:.0f}) |" in row
        assert row.startswith(f"| {t} (champion) |") == (t == champion.iteration)


def test_the_tiny_lora_config_trains_one_adapter_served_by_an_engine_that_keeps_its_base(live_stack, tmp_path):
    """configs/tiny-lora.yaml in one job: one vLLM engine starts on the base and never loads
    weights again; each iteration continues the previous adapter (pi_t = base + adapter_t, as
    the iteration's MLflow run records), publishes it alone, on the base, logged and registered
    as the iteration's model version naming the base, and the policy learns."""
    out = tmp_path / "lora"
    done = submit(live_stack, out, config="configs/tiny-lora.yaml")
    assert "SPPO finished" in done.stdout and done.stdout.count("sampling: starting 1 vLLM engine(s)") == 1
    assert "vLLM engine(s) loaded" not in done.stdout  # no call moved base weights
    record = json.loads((out / "run.json").read_text())
    runs = nested_runs(live_stack, record["experiment_id"], record["parent_run_id"])
    assert sorted(runs) == ["iter-1", "iter-2", "iter-3"]
    found = {}
    for t in (1, 2, 3):
        params = {p["key"]: p["value"] for p in runs[f"iter-{t}"]["data"]["params"]}
        assert params["policy.input"] == ("tiny:policy" if t == 1 else
                                          f"tiny:policy + adapter {out}/iter-{t - 1}/checkpoint/adapter")
        assert params["train.lora.rank"] == "16"
        found[t] = {m["key"]: m["value"] for m in runs[f"iter-{t}"]["data"]["metrics"]}
        assert found[t]["time/sampling/weights_load_s"] == 0.0
        checkpoint = out / f"iter-{t}" / "checkpoint"
        adapter = json.loads((checkpoint / "adapter" / "adapter_config.json").read_text())
        assert "iter-" not in adapter["base_model_name_or_path"]  # the base, not an earlier iteration
        assert sorted(p.name for p in checkpoint.iterdir()) == ["README.md", "adapter"]  # no full weights
        logged = rest(live_stack, "artifacts/list", {"run_id": runs[f"iter-{t}"]["info"]["run_id"],
                                                     "path": "checkpoint/adapter"})["files"]
        assert {f["path"] for f in logged} >= {"checkpoint/adapter/adapter_config.json",
                                               "checkpoint/adapter/adapter_model.safetensors"}
    versions = rest(live_stack, "model-versions/search", {"filter": "name = 'sppo-tiny-lora'"})["model_versions"]
    mine = [v for v in versions if v["run_id"] in {runs[f"iter-{t}"]["info"]["run_id"] for t in (1, 2, 3)}]
    assert len(mine) == 3
    for version in mine:
        tags = {tag["key"]: tag["value"] for tag in version["tags"]}
        assert (tags["base_model"], tags["library_name"], tags["adapter"]) == ("tiny:policy", "peft", "lora rank 16")
    rates = [found[t]["eval/win_rate_vs_base"] for t in (1, 2, 3)]
    assert rates[0] < rates[1] < rates[2] and rates[2] >= 0.65, rates


CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def test_mlflow_ui_shows_the_run_in_a_real_browser(demo, tmp_path):
    """Headless Chromium, on a new profile, follows the links the demo printed: the first lands on
    the runs table of the model-training view (not MLflow's GenAI traces overview), with the
    parent run and its iter-1..3 runs once expanded; the second on the parent's per-iteration
    charts (held-out win rates, length-controlled and raw, with their intervals, final loss)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    assert not missing, f"{missing} missing: apt-get install chromium chromium-driver (.ci/run installs them)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as seen
    from selenium.webdriver.support.ui import WebDriverWait

    stack = demo.stack
    record = json.loads((demo.output_dir / "run.json").read_text())
    experiment_id, parent_id = record["experiment_id"], record["parent_run_id"]
    links = dict(re.findall(r"^MLflow (runs|curves):\s+(\S+)$", demo.log, re.M))
    assert links["runs"].startswith(f"{stack.mlflow_url}/#/experiments/{experiment_id}/runs"), demo.log[-3000:]

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1600,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    wait = WebDriverWait(browser, 120)
    screenshots = [tmp_path / "mlflow-runs.png", tmp_path / "mlflow-curves.png"]
    try:
        browser.get(links["runs"])
        parent = wait.until(seen.presence_of_element_located((By.CSS_SELECTOR, f"a[href*='/runs/{parent_id}']")))
        landing = browser.find_element(By.TAG_NAME, "body").text
        assert "Run Name" in landing and "Traces\n0" not in landing and "No data available" not in landing
        assert f"/experiments/{experiment_id}/runs" in browser.current_url
        # The parent's name cell holds an expander button; expanded, the nested runs are rows too.
        parent.find_element(By.XPATH, "./ancestor::*[@role='gridcell'][1]").find_element(By.TAG_NAME, "button").click()
        for name in ("iter-1", "iter-2", "iter-3"):
            wait.until(seen.presence_of_element_located((By.LINK_TEXT, name)))
        browser.save_screenshot(str(screenshots[0]))

        browser.get(links["curves"])

        def charted(*names: str):  # the UI renders the charts in view only
            return lambda b: all(f"\n{name}\n" in b.find_element(By.TAG_NAME, "body").text for name in names)

        # The parent's series, length-controlled win rates first (in logging and in name order alike).
        wait.until(charted("lc_win_rate_vs_base", "lc_win_rate_vs_base_ci_low", "lc_win_rate_vs_base_ci_high"))
        browser.save_screenshot(str(screenshots[1]))
        browser.execute_script("arguments[0].scrollIntoView()", browser.find_element(By.XPATH, "//*[text()='train']"))
        wait.until(charted("final_loss"))
    finally:
        browser.quit()
    print(f"MLflow UI screenshots: {screenshots}")
    assert all(shot.stat().st_size > 10_000 for shot in screenshots)
