"""End to end, one job per objective: configs/tiny-{dpo,ipo,simpo,wpo}.yaml submitted with
`ray job submit` to a real Ray head, each logging to a real MLflow server like SPPO does.

One iteration of 8 prompts each, so the four jobs together stay within a few minutes on 2 cores.
The ipo job is also the one that takes its reference log-probs from the sampler.
"""

from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

from tests.live_stack import nested_runs, rest, submit

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

# objective -> (judge kind, hybrid candidates)
OBJECTIVES = {
    "dpo": ("reward_model", False),
    "ipo": ("pairrm", False),
    "simpo": ("reward_model", False),
    "wpo": ("reward_model", True),
}


@pytest.mark.parametrize("objective", sorted(set(OBJECTIVES) - {"ipo"}))
def test_objective_config_runs_end_to_end(live_stack, tmp_path, objective):
    out = tmp_path / objective
    done = submit(live_stack, out, config=f"configs/tiny-{objective}.yaml")
    # vLLM's own lines stay in the engine's third-party log, out of the job's.
    assert "Initializing a V1 LLM engine" not in done.stdout and "sampling: starting 1 vLLM engine" in done.stdout
    check_objective_run(live_stack, out, objective, done.stdout)


def check_objective_run(live_stack, out, objective: str, log: str) -> None:
    """The job finished with one iteration of `objective`: its MLflow record, loss curve, data and checkpoint."""
    judge_kind, hybrid = OBJECTIVES[objective]
    assert "SPPO finished" in log
    record = json.loads((out / "run.json").read_text())
    assert rest(live_stack, "runs/get", {"run_id": record["parent_run_id"]})["run"]["info"]["status"] == "FINISHED"
    runs = nested_runs(live_stack, record["experiment_id"], record["parent_run_id"])
    assert list(runs) == ["iter-1"]
    run = runs["iter-1"]
    assert run["info"]["status"] == "FINISHED"
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert (params["train.loss"], params["judge.kind"]) == (objective, judge_kind)

    # The per-step loss curve reached MLflow; its values are the objective's, not SPPO's.
    history = rest(live_stack, "metrics/get-history", {"run_id": run["info"]["run_id"], "metric_key": "train/loss"})
    losses = [m["value"] for m in history["metrics"]]
    epochs = 2 if objective == "wpo" else 1
    assert len(losses) == epochs and all(math.isfinite(v) and v > 0 for v in losses)
    # Step 1 runs before any update, so the policy is still pi_ref and every log-ratio is 0:
    # dpo = -log sigmoid(0) = log 2, ipo = (0 - 1/(2 beta))^2 = 1 at beta 0.5, and wpo = w log 2
    # with WPO's weights w <= 1. simpo is reference-free: no closed form at step 1.
    first = {"dpo": math.log(2.0), "ipo": 1.0}
    if objective in first:
        assert losses[0] == pytest.approx(first[objective], abs=1e-3)
    if objective == "wpo":
        assert losses[0] <= math.log(2.0) + 1e-3
    metrics = {m["key"]: m["value"] for m in run["data"]["metrics"]}

    pairs = pq.read_table(out / "iter-1" / "pairs.parquet").to_pylist()
    judged = pq.read_table(out / "iter-1" / "judgments.parquet").to_pylist()
    assert len(pairs) == len(judged) == 8
    assert all(row["chosen"] != row["rejected"] for row in pairs)
    for row in judged:
        flags = row["off_policy"]
        assert len(flags) == len(row["candidates"]) == len(row["win_matrix"])
        assert sum(flags) == (1 if hybrid else 0)  # the bundled set's one response per prompt
    if hybrid:
        assert metrics["judging/off_policy_candidates"] == 8
        # Every pair's off-policy flags say where its texts came from.
        for pair, row in zip(pairs, judged, strict=True):
            offline = {c for c, f in zip(row["candidates"], row["off_policy"]) if f}
            assert pair["chosen_off_policy"] == (pair["chosen"] in offline)
            assert pair["rejected_off_policy"] == (pair["rejected"] in offline)
    else:
        assert not any(p["chosen_off_policy"] or p["rejected_off_policy"] for p in pairs)
    assert {"pairs/chosen_off_policy_share", "time/judging_s", "train/final_loss"} <= set(metrics)
    # Every shipped config holds prompts out: pi_1 against pi_0, raw and at equal length.
    assert {"eval/win_rate_vs_base", "eval/lc_win_rate_vs_base", "eval/mean_response_chars",
            "eval/base_mean_response_chars"} <= set(metrics)
    assert (out / "iter-1" / "checkpoint" / "config.json").exists()


def test_ipo_with_the_reference_from_the_sampler_runs_end_to_end(live_stack, tmp_path):
    """configs/tiny-ipo.yaml with train.reference_logps 'sampler' through the whole pipeline:
    vLLM records each candidate's token ids and log-probs, the pairs carry the chosen and
    rejected ones', and training takes them as pi_ref. At step 1 pi_theta is pi_t, so the IPO
    loss is (0 - 1)^2 = 1 to the precision at which vLLM's float32 log-probs equal the ZeRO-3
    trainer's. (The policy's own reference pass is what the other objectives' jobs run.)"""
    out = tmp_path / "ipo"
    # float32, the default engine dtype; --verbose streams the actors' third-party output too.
    done = submit(live_stack, out, "--set", "train.reference_logps=sampler", "--verbose",
                  config="configs/tiny-ipo.yaml")
    check_objective_run(live_stack, out, "ipo", done.stdout)
    assert "Initializing a V1 LLM engine" in done.stdout and "dtype=torch.float32" in done.stdout
    record = json.loads((out / "run.json").read_text())
    run = nested_runs(live_stack, record["experiment_id"], record["parent_run_id"])["iter-1"]
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.reference_logps"] == "sampler"
    history = rest(live_stack, "metrics/get-history", {"run_id": run["info"]["run_id"], "metric_key": "train/loss"})
    assert history["metrics"][0]["value"] == pytest.approx(1.0, abs=1e-3)

    samples = pq.read_table(out / "iter-1" / "samples.parquet").to_pylist()
    pairs = pq.read_table(out / "iter-1" / "pairs.parquet").to_pylist()
    assert len(pairs) == len(samples) == 8
    for sample, pair in zip(samples, pairs, strict=True):
        assert sample["prompt"] == pair["prompt"]
        columns = (sample["candidates"], sample["candidate_token_ids"], sample["candidate_token_logps"])
        tokens = {text: (ids, logps) for text, ids, logps in zip(*columns, strict=True)}
        for side in ("chosen", "rejected"):
            assert (pair[f"{side}_token_ids"], pair[f"{side}_token_logps"]) == tokens[pair[side]]
            assert all(v <= 0 for v in pair[f"{side}_token_logps"])
