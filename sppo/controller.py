"""The SPPO controller: the paper's iteration loop as a single Ray driver.

for t = 1..T:
    x ~ D_t                                   (the iteration's own prompt split)
    y_1..y_K ~ pi_t(. | x)                    (vLLM engines, Ray actors)
    P_ij = P(y_i beats y_j | x)               (PairRM, a Ray actor)
    (y_w, y_l, P(y_w beats pi_t), P(y_l beats pi_t))
    pi_{t+1} = argmin SPPO loss, ref = pi_t   (DeepSpeed ZeRO-3 in a Ray Train TorchTrainer)

Each stage publishes its output atomically under `<output_dir>/iter-t/` and records it in the
run manifest; a re-submitted job runs only the stages the manifest does not vouch for, and
those that read their outputs (`RunManifest.redo_plan`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer

from sppo.config import RunConfig
from sppo.devtools.faults import kill_point
from sppo.evaluation import CHAMPION_ALIAS, choose_champion, evaluate, length_gain_warnings, length_notes
from sppo.judging import JUDGES
from sppo.manifest import STAGES, RunManifest
from sppo.model_card import CARD_FILE, card_summary, registry_tags, write_card
from sppo.pairs import hybrid_candidates, training_rows
from sppo.prompts import dataset_responses, heldout_prompts, iteration_prompts, prompt_length_filter
from sppo.models import local_model
from sppo.node_metrics import NodeMonitors
from sppo.plan import PlacementError, job_placement
from sppo.policy import ADAPTER_DIR, Policy
from sppo.preflight import preflight
from sppo.roles import run_roles
from sppo.run_directory import IterationDir
from sppo.sampling import EnginePool, Samples
from sppo.storage import SharedStorage, read_parquet
from sppo.tracking import Tracker, sample_table
from sppo.training import train_policy

log = logging.getLogger("sppo")


def run_iteration(cfg: RunConfig, rec: "IterationRecord", engines: EnginePool, policy: Policy, judge: str,
                  todo: tuple[str, ...] = STAGES) -> Policy:
    """One SPPO iteration, pi_t -> pi_{t+1}: the stages in `todo`, the rest done by an earlier
    attempt (`RunManifest.redo_plan`). policy: pi_t, the base model at the first iteration."""
    it = rec.it
    if "sampling" in todo:
        sample_stage(cfg, rec, engines, policy)  # y_1..y_K ~ pi_t(. | x) for x in D_t
    if "judging" in todo:
        judge_stage(cfg, rec, judge)            # P_ij = P(y_i beats y_j | x)
    if "pairs" in todo:
        pairs_stage(cfg, rec)                   # (y_w, y_l, P(y_w beats pi_t), P(y_l beats pi_t))
    if "training" in todo:
        engines.release()                       # sleep mode: the accelerators go to the trainer
        train_stage(cfg, rec, policy)           # pi_{t+1} = argmin SPPO loss, ref = pi_t
    else:  # trained by an earlier attempt: its per-step curve goes into this run too
        rec.tracker.log_history(rec.run_id, json.loads(it.train_history.read_text()))
    if "evaluation" in todo:
        evaluation_stage(cfg, rec, engines, policy)  # pi_{t+1} vs pi_t and pi_0
    with rec.stage("tracking", card=it.checkpoint / CARD_FILE):
        rec.log_outputs()
    return published_policy(cfg, it)


def published_policy(cfg: RunConfig, it: IterationDir) -> Policy:
    """pi_{t+1} as iteration it published it: its checkpoint, or with train.lora the base plus
    its adapter, which continued pi_t's (the engines keep the base; the next iteration continues
    the adapter)."""
    if cfg.train.lora is None:
        return Policy(str(it.checkpoint))
    return Policy(cfg.policy.path, str(it.checkpoint / ADAPTER_DIR))


# Each stage reads its input from the iteration directory and publishes its output there.
# Engines, judges and train workers get models and directories as `rec.for_workers` names them.


def sample_stage(cfg: RunConfig, rec: "IterationRecord", engines: EnginePool, policy: Policy) -> None:
    it, t = rec.it, rec.it.iteration
    selection = iteration_prompts(cfg.prompts, t, too_long=too_long_filter(cfg, policy.weights))
    rec.record({f"prompts/{k}": v for k, v in selection.counts.items()})
    log.info("%s", selection.summary(t, cfg.train.max_prompt_length))
    prompts, token_logps = selection.prompts, cfg.train.reference_logps == "sampler"
    with rec.stage("sampling", samples=it.samples):
        samples = engines.sample(policy.mapped(rec.for_workers), prompts, seed=cfg.sampling.seed + 1000 * t,
                                 token_logps=token_logps)
        rows = [{"prompt": p, "candidates": c} for p, c in zip(prompts, samples.candidates)]
        if token_logps:  # log pi_t of the sampled tokens: the trainer's reference log-probs
            for row, ids, logps in zip(rows, samples.token_ids, samples.token_logps, strict=True):
                row.update(candidate_token_ids=ids, candidate_token_logps=logps)
        rec.publish(it.samples, rows, {**sampling_metrics(samples.candidates, samples.num_generated_tokens),
                                       **engine_metrics("sampling", samples)})


def judge_stage(cfg: RunConfig, rec: "IterationRecord", judge: str) -> None:
    it = rec.it
    prompts, sampled = _columns(read_parquet(it.samples, columns=["prompt", "candidates"]), "prompt", "candidates")
    # Hybrid candidates: the dataset's own responses (prompts.response_column) join the sampled ones.
    offline = dataset_responses(cfg.prompts, it.iteration)
    candidates, off_policy = hybrid_candidates(sampled, [offline.get(p, []) for p in prompts])
    with rec.stage("judging", judgments=it.judgments):
        matrices = JUDGES[cfg.judge.kind](judge, prompts, candidates, cfg.judge, run_roles(cfg).judging)
        rec.publish(it.judgments, [{"prompt": p, "candidates": c, "off_policy": f, "win_matrix": m.tolist()}
                                   for p, c, f, m in zip(prompts, candidates, off_policy, matrices)],
                    {"judging/off_policy_candidates": sum(map(sum, off_policy))})


def pairs_stage(cfg: RunConfig, rec: "IterationRecord") -> None:
    it = rec.it
    judged = read_parquet(it.judgments)
    prompts, candidates, matrices = _columns(judged, "prompt", "candidates", "win_matrix")
    # Judgments written before hybrid candidates existed have no off_policy column: all sampled.
    off_policy = [row.get("off_policy") or [False] * len(row["candidates"]) for row in judged]
    tokens = sampled_tokens(it.samples) if cfg.train.reference_logps == "sampler" else (None, None)
    with rec.stage("pairs", pairs=it.pairs):
        rows = training_rows(prompts, candidates, [np.asarray(m) for m in matrices], off_policy, *tokens)
        kill_point("pairs")  # fault-injection tests only: rows built, not yet published
        rec.publish(it.pairs, rows, pair_metrics(rows))


def train_stage(cfg: RunConfig, rec: "IterationRecord", policy: Policy) -> None:
    it, for_workers = rec.it, rec.for_workers
    # Held-out samples of a pi_{t+1} this stage replaces (a changed train.* config) are not reused.
    it.eval_samples.unlink(missing_ok=True)
    with rec.stage("training", checkpoint=it.checkpoint, train_history=it.train_history):
        result = train_policy(str(it.pairs), policy.mapped(for_workers), for_workers(str(it.checkpoint)), cfg.train,
                              storage_dir=for_workers(str(it.path / "ray_train")),
                              mlflow_tracking_uri=rec.tracker.uri, mlflow_run_id=rec.run_id,
                              role=run_roles(cfg).training, trust_remote_code=cfg.policy.trust_remote_code)
        it.run.pull(it.checkpoint)  # with shared storage the workers wrote it there: the driver's copy
        it.run.write_text(it.train_history, json.dumps(result.history))
    # Inside time/training_s: setup, reference log-probs, optimizer steps, checkpoint save.
    rec.record({**({"train/final_loss": result.metrics["train/loss"]} if result.history else {}),
                **{f"time/training/{phase}_s": s for phase, s in result.timings.items()}})


def policy_tokenizer(cfg: RunConfig, policy: str):
    """The tokenizer of `policy` (a model directory, hub id or tiny: spec)."""
    return AutoTokenizer.from_pretrained(local_model(policy), trust_remote_code=cfg.policy.trust_remote_code)


def too_long_filter(cfg: RunConfig, policy: str):
    """Is a prompt, rendered with the policy's chat template, over train.max_prompt_length tokens?"""
    return prompt_length_filter(policy_tokenizer(cfg, policy), cfg.train.max_prompt_length)


def sampled_tokens(samples_path: Path) -> tuple[list, list]:
    """Every candidate's token ids and log-probs as the sampling stage recorded them."""
    sampled = read_parquet(samples_path)
    if sampled and "candidate_token_logps" not in sampled[0]:
        raise ValueError(f"{samples_path} has no candidate_token_logps: it was sampled without "
                         "train.reference_logps 'sampler'; move it aside to sample again, or use 'policy'")
    return _columns(sampled, "candidate_token_ids", "candidate_token_logps")


def evaluation_stage(cfg: RunConfig, rec: "IterationRecord", engines: EnginePool, policy: Policy) -> None:
    # The new policy against this iteration's input and the base, on prompts never trained on.
    it, t = rec.it, rec.it.iteration
    tokenizer = policy_tokenizer(cfg, cfg.policy.path)  # filters the prompts, and counts the answers' tokens
    heldout = heldout_prompts(cfg.prompts, too_long=prompt_length_filter(tokenizer, cfg.train.max_prompt_length))
    if not heldout:  # no held-out prompts configured (or none fits): nothing to evaluate, and done
        rec.manifest.record_stage(t, "evaluation", cfg, {}, rec.run_id)
        return
    policies = {0: Policy(cfg.policy.path).mapped(rec.for_workers), t - 1: policy.mapped(rec.for_workers),
                t: published_policy(cfg, it).mapped(rec.for_workers)}
    with rec.stage("evaluation", eval_judgments=it.eval_judgments):
        rows, metrics = evaluate(cfg, it.run, t, policies, heldout, engines, tokenizer)
        rec.publish(it.eval_judgments, rows, metrics)
    for note in length_notes(metrics) + length_gain_warnings(metrics):
        log.warning("iteration %d: %s", t, note)


def run_sppo(cfg: RunConfig, resume_from: int | None = None, force: bool = False, checked: bool = False) -> list[Path]:
    """Run iterations until cfg.iterations; returns every iteration's checkpoint directory.
    checked: the caller ran `preflight` on output_dir already (the CLI does, before Ray starts)."""
    out = Path(cfg.output_dir).resolve()
    manifest = preflight(cfg, resume_from, force, SharedStorage.open(cfg.storage_uri, out), checked=checked)
    placement = job_placement(cfg)  # every stage against the live cluster, before the first one
    if placement.problems:
        raise PlacementError("; ".join(placement.problems))
    for note in placement.notes:
        log.warning("placement: %s", note)
    return _run_iterations(cfg, manifest, resume_from, placement.engine_mode)


def _run_iterations(cfg: RunConfig, manifest: RunManifest, resume_from: int | None, engine_mode: str) -> list[Path]:
    run = manifest.run  # the output directory, and the shared storage it is mirrored to
    tracker = Tracker(cfg.tracking.resolved_uri, cfg.tracking.experiment, run, cfg.tracking.system_metrics)
    tracker.start_parent(cfg.tracking.run_name or run.root.name, cfg.flat())
    links = tracker.ui_links()
    log.info("MLflow: runs %s ; per-iteration curves %s", links["runs"], links["curves"])
    run.write_text(run.config_file, cfg.to_yaml())
    if resume_from:  # an explicit restart redoes iteration N onwards; earlier outputs are kept aside
        for t in range(resume_from, cfg.iterations + 1):
            if (moved := run.archive(t)) is not None:
                manifest.forget(t)
                log.info("iteration %d: earlier outputs moved to %s", t, moved)
    plan = manifest.redo_plan(cfg)  # iteration -> the stages it runs; iterations the manifest vouches for are absent
    first = min(plan, default=cfg.iterations + 1)
    policy = Policy(cfg.policy.path) if first == 1 else published_policy(cfg, run.iteration(first - 1))
    judge = run.for_workers(cfg.judge.model_path or "")  # each judge actor resolves it on its node
    status = "FAILED"
    # One set of vLLM engines for the whole job: each iteration's stages load the policy they need
    # (with train.lora, the engines keep the base and serve each iteration's adapter).
    engines = EnginePool(cfg.sampling.model_copy(update={"engine_mode": engine_mode}), run_roles(cfg).sampling,
                         cfg.policy.trust_remote_code, max_lora_rank=cfg.train.lora.rank if cfg.train.lora else None)
    # Every node's CPU, memory, disk, network (and GPU) as the parent run's system/<node>/*.
    node_monitors = NodeMonitors(tracker.parent_id, tracker.uri) if cfg.tracking.system_metrics else None
    try:
        for t, todo in plan.items():
            log.info("=== iteration %d/%d: policy %s", t, cfg.iterations, policy)
            if todo != STAGES:
                log.info("iteration %d: running %s (the manifest vouches for the other stages)", t, ", ".join(todo))
            with IterationRecord.open(tracker, manifest, run.iteration(t), cfg, policy, engines.mode) as rec:
                policy = run_iteration(cfg, rec, engines, policy, judge, todo)
            log.info("=== iteration %d done: %s", t, rec.summary())
        status = "FINISHED"
    finally:
        engines.close()
        if node_monitors is not None:
            node_monitors.stop()
        tracker.finish_parent(status)
    return [run.iteration(t).checkpoint for t in range(1, cfg.iterations + 1)]


def sampling_metrics(candidates: list[list[str]], generated_tokens: int) -> dict[str, float]:
    flat = [c for cands in candidates for c in cands]
    return {
        "sampling/prompts": len(candidates),
        "sampling/candidates": len(flat),
        "sampling/generated_tokens": generated_tokens,
        "sampling/mean_response_tokens": generated_tokens / max(len(flat), 1),
        "sampling/mean_response_chars": float(np.mean([len(c) for c in flat])) if flat else 0.0,
    }


def engine_metrics(stage: str, samples: Samples) -> dict[str, float]:
    """What starting engines and loading the policy cost a stage (0 starts: engines were kept)."""
    return {f"{stage}/engine_starts": samples.engine_starts, f"time/{stage}/engine_start_s": samples.engine_start_s,
            f"time/{stage}/weights_load_s": samples.weights_load_s}


def pair_metrics(rows: list[dict]) -> dict[str, float]:
    return {
        "pairs/rows": len(rows),
        "pairs/mean_chosen_win_prob": float(np.mean([r["chosen_probs_win"] for r in rows])),
        "pairs/mean_rejected_win_prob": float(np.mean([r["chosen_probs_lose"] for r in rows])),
        "pairs/mean_chosen_over_rejected_prob": float(np.mean([r["chosen_probs"] for r in rows])),
        "pairs/chosen_off_policy_share": float(np.mean([r["chosen_off_policy"] for r in rows])),
        "pairs/rejected_off_policy_share": float(np.mean([r["rejected_off_policy"] for r in rows])),
    }


def _columns(rows: list[dict], *names: str) -> tuple[list, ...]:
    return tuple([row[name] for row in rows] for name in names)


class IterationRecord:
    """An iteration's nested MLflow run plus its metrics file, kept in step."""

    def __init__(self, tracker: Tracker, manifest: RunManifest, it: IterationDir, cfg: RunConfig, run_id: str):
        self.tracker, self.manifest, self.it, self.cfg, self.run_id = tracker, manifest, it, cfg, run_id

    @classmethod
    @contextlib.contextmanager
    def open(cls, tracker: Tracker, manifest: RunManifest, it: IterationDir, cfg: RunConfig, policy: Policy,
             engine_mode: str):
        run_id = tracker.start_iteration(it.iteration, {**cfg.flat(), "iteration": it.iteration,
                                                        "policy.input": str(policy), "sampling.engine_mode_used": engine_mode})
        rec = cls(tracker, manifest, it, cfg, run_id)
        tracker.log_metrics(run_id, it.read_metrics())  # stages finished by an earlier attempt
        try:
            yield rec
        except BaseException:
            tracker.finish(run_id, "FAILED")
            raise
        tracker.finish(run_id, "FINISHED")

    @contextlib.contextmanager
    def stage(self, name: str, **outputs: Path):
        """Times a stage; once it completes, the manifest records its outputs and their hashes."""
        log.info("iteration %d: %s ...", self.it.iteration, name)
        start = time.perf_counter()
        yield
        seconds = time.perf_counter() - start
        self.record({f"time/{name}_s": seconds})
        self.manifest.record_stage(self.it.iteration, name, self.cfg, outputs, self.run_id)
        log.info("iteration %d: %s done in %.1f s", self.it.iteration, name, seconds)

    def for_workers(self, spec: str) -> str:
        return self.it.run.for_workers(spec)

    def record(self, metrics: dict[str, float]) -> None:
        self.it.add_metrics(metrics)
        self.tracker.log_metrics(self.run_id, metrics)

    def publish(self, path: Path, rows: list[dict], metrics: dict[str, float]) -> None:
        self.it.run.write_rows(path, rows)
        self.record(metrics)

    def log_outputs(self) -> None:
        for data in (self.it.samples, self.it.judgments, self.it.pairs, self.it.train_history):
            self.tracker.log_artifact(self.run_id, data, "data")
        if (judged := self.it.eval_judgments).exists():
            self.tracker.log_artifact(self.run_id, judged, "data")
        if rows := self.cfg.tracking.sample_table_rows:
            self.tracker.log_table(self.run_id, sample_table(self.it.judgments, self.it.pairs, rows), "samples.json")
        kill_point("tracking")  # fault-injection tests only: data logged, checkpoint not yet
        card = write_card(self.cfg, self.it)  # README.md, logged and registered with the checkpoint
        self.tracker.log_artifacts(self.run_id, self.it.checkpoint, "checkpoint")
        if self.cfg.tracking.register_model:
            version = self.tracker.register_checkpoint(
                self.run_id, self.cfg.tracking.register_model, "checkpoint", description=card_summary(card),
                tags=registry_tags(self.cfg, self.it.read_metrics()))
            self.record({"registry/model_version": float(version)})
        self.crown_champion()
        # The parent run's per-iteration curves (step = iteration), as the published cards compare
        # iterations: the win rates, length-controlled first, with their intervals, pi_t's mean
        # length and the final loss.
        metrics = self.it.read_metrics()
        curves = [f"eval/{rate}_{other}{bound}" for other in ("vs_base", "vs_prev")
                  for rate in ("lc_win_rate", "win_rate") for bound in ("", "_ci_low", "_ci_high")]
        curves += ["eval/mean_response_chars", "train/final_loss"]
        self.tracker.log_metrics(self.tracker.parent_id, {k: metrics[k] for k in curves if k in metrics},
                                 step=self.it.iteration)

    def crown_champion(self) -> None:
        """The run's champion so far (`choose_champion` over iterations 1..t), in the log and, with
        tracking.register_model, as the registered model's alias `champion` on its version."""
        t, model = self.it.iteration, self.cfg.tracking.register_model
        metrics = {s: self.it.run.iteration(s).read_metrics() for s in range(1, t + 1)}
        champion = choose_champion(metrics)
        if not model:
            log.info("iteration %d: champion: %s", t, champion.reason)
            return
        version = metrics[champion.iteration].get("registry/model_version") if champion.iteration else None
        self.tracker.point_alias(model, CHAMPION_ALIAS, None if version is None else str(int(version)))
        if version is not None:
            where = f"{model} version {int(version)} is '{CHAMPION_ALIAS}'"
        elif champion.iteration is not None:
            where = f"iteration {champion.iteration} was not registered as a version of {model}"
        else:
            where = f"no version of {model} is this run's '{CHAMPION_ALIAS}'"
        log.info("iteration %d: champion: %s: %s", t, where, champion.reason)

    def summary(self) -> str:
        m = self.it.read_metrics()
        keys = ["pairs/rows", "pairs/mean_chosen_win_prob", "pairs/mean_rejected_win_prob", "train/final_loss",
                "eval/lc_win_rate_vs_base", "eval/win_rate_vs_base", "eval/win_rate_vs_prev",
                "eval/mean_response_chars"]
        parts = [f"{k}={m[k]:.4g}" for k in keys if k in m]
        parts += [f"{k[5:-2]}={v:.1f}s" for k, v in m.items() if k.startswith("time/")]
        return ", ".join(parts) + f"; checkpoint {self.it.checkpoint}"
