"""Typed, validated run configuration: YAML file + dotted `--set` overrides.

Every field is checked (type, range, unknown keys) before any compute starts, and
errors name the offending field, e.g. ``sampling.k: Input should be >= 2``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer, model_validator


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the field or file."""


def without_unset(section: dict[str, Any], field: str) -> dict[str, Any]:
    """A section's dump without an optional `field` left unset (None): a field added later stays
    out of the config's record (config.yaml, MLflow params, the stage digests), so output
    directories made before it existed keep their digests and nothing is redone."""
    if section.get(field, False) is None:
        del section[field]
    return section


class _Strict(BaseModel):
    # No float field means anything at inf or nan (train.eta: .inf would fail only after sampling).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class PolicyConfig(_Strict):
    """The policy trained: pi_0, the model the first iteration starts from."""

    # A local Hugging Face model directory, a hub id (GPU clusters), or "tiny:policy",
    # the embedded tiny Llama that is built from code on first use.
    path: str = "tiny:policy"
    # Run the model's own code from the hub; passed explicitly to vLLM, the trainers and every
    # tokenizer load. Off unless a config turns it on.
    trust_remote_code: bool = False


class PromptsConfig(_Strict):
    """Where each iteration's prompts and the held-out prompts come from (sppo/prompts.py)."""

    # "builtin:tiny" (the bundled prompt set), a local .jsonl / .parquet file or saved-dataset
    # directory, or "hf:<repo>" (a Hugging Face hub dataset). "{t}" in source or split marks
    # ready-made per-iteration splits (e.g. split "train_iteration_{t}"); without it the
    # source is cut into num_splits disjoint seeded parts.
    source: str = "builtin:tiny"
    # The split read from a hub dataset or a saved-dataset directory with splits; a .jsonl or
    # .parquet file has none and ignores it.
    split: str = "train"
    # The column (a JSONL key) holding each prompt: a plain string, rendered as one user turn
    # with the policy's chat template. Empty prompts and duplicates are dropped.
    column: str = "prompt"
    # Prompts each iteration takes from its own disjoint split (None: the whole split).
    per_iteration: int | None = Field(default=None, ge=1)
    # Hybrid candidates: a column of the source holding the dataset's own response (a string)
    # or responses (a list of strings) to each prompt, e.g. UltraFeedback's completions. They
    # join the K sampled candidates before judging, marked off-policy. None: on-policy only.
    response_column: str | None = None
    # Number of disjoint splits the source is cut into; at least the number of iterations.
    num_splits: int = Field(default=3, ge=1)
    # Seed of the shuffle that cuts a pooled source into its splits and picks the eval_size
    # held-out prompts.
    seed: int = 42
    # Held-out prompts for evaluation, never used for training: eval_size prompts set aside
    # from a pooled source before it is cut, or (sources with "{t}") a seeded sample of
    # eval_size prompts of the split eval_split (0: all of it).
    eval_size: int = Field(default=0, ge=0)
    # Sources with "{t}" only: the split held out for evaluation (with "{t}" read as 1); a
    # held-out prompt that also appears in a training split is left out of training.
    eval_split: str | None = None

    @model_validator(mode="after")
    def _held_out_set_is_named(self) -> "PromptsConfig":
        ready = "{t}" in self.source or "{t}" in self.split
        if ready and self.eval_size and self.eval_split is None:
            raise ValueError(f"eval_size ({self.eval_size}) with ready-made splits (\"{{t}}\" in source or split) "
                             "needs eval_split, the split it samples the held-out prompts from")
        if not ready and self.eval_split is not None:
            raise ValueError(f"eval_split ({self.eval_split!r}) is for ready-made splits only (\"{{t}}\" in source "
                             "or split); a pooled source holds out prompts.eval_size prompts")
        return self


class SamplingConfig(_Strict):
    """The vLLM engines (Ray actors) that sample K candidates per prompt (sppo/sampling.py)."""

    k: int = Field(default=5, ge=2, description="candidates per prompt (one n=K request)")
    # vLLM's sampling temperature (0: greedy).
    temperature: float = Field(default=0.7, ge=0.0)
    # Nucleus sampling: the smallest set of tokens whose probability reaches top_p.
    top_p: float = Field(default=0.9, gt=0.0, le=1.0)
    # The most tokens an answer may have; a longer one is cut (and has no EOS).
    max_tokens: int = Field(default=2048, ge=1)
    # Iteration t's engines are seeded seed + 1000 t + the engine's index, so a re-sampled
    # iteration draws the same candidates.
    seed: int = 0
    # vLLM engines, each a Ray actor; an iteration's prompts are cut into one contiguous shard each.
    num_engines: int = Field(default=1, ge=1)
    # Ray CPUs each engine actor reserves.
    cpus_per_engine: float = Field(default=1.0, ge=0.0)
    # Ray GPUs each engine actor reserves (0: a CPU engine); they hold its tensor-parallel shards.
    gpus_per_engine: float = Field(default=0.0, ge=0.0)
    # vLLM's tensor parallelism: GPUs one engine spreads its model over, on one node; `--plan`
    # refuses a GPU engine whose gpus_per_engine is smaller.
    tensor_parallel_size: int = Field(default=1, ge=1)
    # The engines' weights and activations. float32: their sampled-token log-probs equal the
    # trainer's float32 values to 1e-5 (train.reference_logps: sampler). The GPU configs take
    # bfloat16; auto is vLLM's choice (bfloat16 for a float32 checkpoint on CPUs).
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    # vLLM's max_model_len: prompt and answer tokens of one sequence, which bounds its KV cache;
    # null takes the model's own limit.
    max_model_len: int | None = Field(default=None, ge=1)
    # vLLM's enforce_eager: no compilation (and no CUDA graphs) at engine start; a faster start,
    # slower decoding. Worth it only where starts dominate: the tiny configs (docs/performance.md).
    enforce_eager: bool = False
    # vLLM's gpu_memory_utilization: the share of each GPU's memory an engine takes for its
    # weights and KV cache.
    gpu_memory_utilization: float = Field(default=0.9, gt=0.0, le=1.0)
    # Sequences an engine decodes at once (vLLM's max_num_seqs), up to what its KV cache holds;
    # null takes vLLM's default for the hardware. 1024 is that default on H100-class GPUs; on
    # CPUs, A100s and GPUs under 70 GB it is 256, and a shard's K x prompts candidates beyond it
    # finish in a last, small wave (measured in bench/sample.py, docs/performance.md).
    max_num_seqs: int | None = Field(default=1024, ge=1)
    # vLLM's CPU backend: KV cache size in GiB (VLLM_CPU_KVCACHE_SPACE); ignored on GPUs.
    cpu_kvcache_gib: int = Field(default=1, ge=1)
    # Ray restarts a crashed engine actor this often and retries its shard on it (same policy
    # and seed, so the same candidates); a shard is never lost or sampled twice.
    max_restarts: int = Field(default=1, ge=0)
    # How long engines live (sppo/sampling.py). resident: one start per job, each new policy
    # loaded in place; sleep: resident, but asleep during training (vLLM sleep mode, CUDA only;
    # CPU engines restart instead); restart: started and stopped for every sampling call.
    # auto: resident on CPUs, restart on GPUs. Kept engines hold their Ray resources for the
    # whole job: judging and training must fit beside them (`--plan` checks).
    engine_mode: Literal["auto", "resident", "sleep", "restart"] = "auto"
    # When kept engines would leave no room for judging or training on the live cluster (checked
    # before the first stage, sppo/plan.py), restart them per sampling call instead of waiting;
    # false: the configured mode must fit, or the job refuses to start.
    engine_fallback: bool = True


class RuleJudgeConfig(_Strict):
    """judge.kind rule: a deterministic judge on text features, no model (sppo/judging/rules.py)."""

    # judge.kind "rule": score(y) = sum of weights[f] * f(y) over text features f in [0, 1]
    # (letters: share of ASCII letters and spaces; keywords: share of words in `keywords`;
    # length: characters over 1000, capped at 1),
    # P_ij = sigmoid((s_i - s_j) / temperature). Deterministic, no model. See sppo/judging/rules.py.
    weights: dict[Literal["letters", "keywords", "length"], float] = Field(default_factory=lambda: {"letters": 1.0},
                                                                        min_length=1)
    # The words the keywords feature counts (case-insensitive).
    keywords: list[str] = []
    # P_ij = sigmoid((s_i - s_j) / temperature): the smaller, the surer the judge.
    temperature: float = Field(default=0.02, gt=0.0)


class JudgeConfig(_Strict):
    """The judge that gives each prompt's K x K win probabilities (sppo/judging/)."""

    # pairrm: a pairwise ranker (llm-blender PairRM). reward_model: a scalar reward model (a
    # sequence-classification head, e.g. ArmoRM), P_ij = sigmoid(r_i - r_j). rule: the
    # deterministic rule judge of `rule` below (no model; judge.path is not used). See sppo/judging/.
    kind: Literal["pairrm", "reward_model", "rule"] = "pairrm"
    # A local model directory or hub id: "llm-blender/PairRM" or "tiny:pairrm" (built from code)
    # for pairrm; e.g. "RLHFlow/ArmoRM-Llama3-8B-v0.1" or "tiny:reward" for reward_model.
    path: str = "tiny:pairrm"
    # reward_model only: ArmoRM's gated head is custom code on the hub.
    trust_remote_code: bool = False
    # reference: P_ij = sigmoid(s_i - s_j) from llm-blender's scores (depends on the other
    # candidates); pairwise: from the two orderings of (i, j) alone. See sppo/judging/pairrm.py.
    estimator: Literal["reference", "pairwise"] = "reference"
    batch_size: int = Field(default=32, ge=1, description="ordered pairs (pairrm) or candidates (reward_model) per forward pass")
    # Tokens of the prompt the judge reads (pairrm: llm-blender's source limit, 1224 in the
    # reference; reward_model: the conversation is cut to source_max_length + candidate_max_length).
    source_max_length: int = Field(default=1224, ge=1)
    # Tokens of each candidate the judge reads (pairrm: llm-blender's candidate limit, 412 in the
    # reference: a longer answer is judged on its beginning).
    candidate_max_length: int = Field(default=412, ge=1)
    # pairrm only: DeBERTa's disentangled attention as one SDPA call per layer with cached
    # relative-position indices (sppo/judging/deberta_attention.py); false runs transformers' own.
    fused_attention: bool = True
    # Ray CPUs of the judge's actor (pairrm, reward_model; the rule judge runs in the driver).
    num_cpus: float = Field(default=1.0, ge=0.0)
    # Ray GPUs of the judge's actor (0: on CPUs).
    num_gpus: float = Field(default=0.0, ge=0.0)
    # Ray restarts a crashed judge actor this often and retries the whole judging call on it.
    max_restarts: int = Field(default=1, ge=0)
    rule: RuleJudgeConfig = RuleJudgeConfig()

    @property
    def model_path(self) -> str | None:
        """The judge model to load, or None for the rule judge, which has none (path unused)."""
        return None if self.kind == "rule" else self.path


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
LORA_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_NO_LORA_MODULES = frozenset({"lm_head", "embed_tokens", "embed_in", "embed_out", "wte", "wpe", "word_embeddings",
                              "embeddings", "tok_embeddings", "shared"})


class LoraConfig(_Strict):
    """train.lora: train a peft LoRA adapter on the frozen policy instead of all its weights; each
    iteration publishes the adapter alone (checkpoint/adapter/), continued by the next. docs/lora.md."""

    # Only ranks vLLM serves (its max_lora_rank choices), so an adapter can be served as it is.
    rank: int = 16
    alpha: int = Field(default=32, ge=1)  # scaling alpha / rank; an int, as vLLM reads it
    # Dropout on the adapter's input (peft's lora_dropout).
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # Module names (suffixes) peft wraps; not lm_head or embeddings, whose adapters vLLM's
    # log-prob path ignores (vLLM #51594), so vLLM's log-probs would not be the policy's.
    target_modules: list[str] = Field(default_factory=lambda: list(LORA_TARGET_MODULES), min_length=1)

    @field_validator("rank")
    @classmethod
    def _served_rank(cls, rank: int) -> int:
        if rank not in VLLM_LORA_RANKS:
            raise ValueError(f"{rank} is not a rank vLLM serves; one of {', '.join(map(str, VLLM_LORA_RANKS))}")
        return rank

    @field_validator("target_modules")
    @classmethod
    def _no_head_or_embeddings(cls, names: list[str]) -> list[str]:
        refused = [name for name in names if name.rpartition(".")[2] in _NO_LORA_MODULES]
        if refused:
            raise ValueError(f"{refused}: no adapters on lm_head or embeddings (vLLM's log-probs ignore them)")
        if len(set(names)) != len(names) or not all(name.strip() for name in names):
            raise ValueError(f"{names}: give each module name once, none empty")
        return names


class TrainConfig(_Strict):
    """Training: DeepSpeed ZeRO-3 on Ray Train's workers, RMSprop, one checkpoint per iteration."""

    # sppo (soft, the reference's), sppo_hard, sppo_single, dpo (sigmoid), ipo, simpo
    # (reference-free, length-normalised), wpo (DPO with WPO's pair weights). See docs/losses.md.
    loss: Literal["sppo", "sppo_hard", "sppo_single", "dpo", "ipo", "simpo", "wpo"] = "sppo"
    eta: float = Field(default=1000.0, gt=0.0, description="beta = 1/eta for every loss")
    # simpo only: the target reward margin gamma (SimPO's Gemma-2-9B-It recipe: beta 10, gamma 5).
    simpo_gamma: float = Field(default=0.5, ge=0.0)
    # RMSprop's peak learning rate, reached after the warmup and decayed linearly to 0.
    learning_rate: float = Field(default=5e-7, gt=0.0)
    # The share of an iteration's optimizer steps spent warming the learning rate up linearly.
    warmup_ratio: float = Field(default=0.1, ge=0.0, lt=1.0)
    # SPPO's targets reach eta/2, so unclipped gradients are huge; 1.0 as the reference trains.
    max_grad_norm: float = Field(default=1.0, gt=0.0)
    # Passes over the iteration's pairs.
    epochs: int = Field(default=1, ge=1)
    # Stop after this many optimizer steps, before the epochs end (None: every epoch in full).
    # For quick trials and the scale benchmark; the reference pass still covers every pair.
    # 0 takes no step: the iteration's starting policy goes through the checkpoint path unchanged.
    max_steps: int | None = Field(default=None, ge=0)
    # Pairs each worker takes per forward and backward pass.
    per_device_batch_size: int = Field(default=8, ge=1)
    # Passes per optimizer step; the global batch is per_device_batch_size x this x num_workers.
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    # Ray Train workers, one ZeRO-3 rank each (and one GPU each with use_gpu).
    num_workers: int = Field(default=2, ge=1)
    # Ray CPUs each training worker reserves.
    cpus_per_worker: float = Field(default=1.0, ge=0.0)
    # Ray Train restarts the worker group this often after a worker dies; the iteration then
    # retrains from the policy it started from (no mid-iteration checkpoint: an iteration is
    # short next to a run).
    max_failures: int = Field(default=1, ge=0)
    # One GPU per worker, collectives over NCCL; false: CPUs and gloo.
    use_gpu: bool = False
    # With use_gpu, the share of a GPU each worker reserves in Ray (None: a whole one). A fraction
    # lets one worker share its GPU with a kept, sleeping vLLM engine (docs/lora.md: one GPU);
    # only with num_workers 1, as two NCCL ranks cannot share a device.
    gpus_per_worker: float | None = Field(default=None, gt=0.0, le=1.0)
    # Train in bfloat16 (DeepSpeed's bf16 mode).
    bf16: bool = False
    # Recompute each layer's activations in the backward pass: less memory, more compute.
    gradient_checkpointing: bool = False
    # Tokens of prompt and response kept per sequence; a longer response is cut.
    max_length: int = Field(default=1024, ge=2)
    # Prompts longer than this many tokens (rendered with the chat template) are left out of the
    # iteration and of the held-out set; must be less than max_length.
    max_prompt_length: int = Field(default=512, ge=1)
    # Where log pi_ref(y|x) comes from; pi_ref is the policy the iteration starts from (pi_{t-1},
    # which sampled the candidates). policy: one forward pass of the loaded policy over every
    # pair before the first step. sampler: the log-probs vLLM reported for each sampled token
    # while pi_{t-1} generated it, so training runs no reference pass at all; it then
    # trains on the sampled token ids themselves (no re-tokenized text) and needs on-policy
    # candidates only. It equals the policy pass to within 1e-5 a token in float32 (tests/test_sampling.py).
    # online: the reference pipeline's way, a frozen second copy of pi_{t-1} run forward at every
    # step: the same values at twice the weights' memory (the training benchmark's baseline).
    reference_logps: Literal["policy", "sampler", "online"] = "policy"
    # Seed of the training workers: torch's, and each epoch's shuffle of the pairs.
    seed: int = 42
    # A LoRA adapter is trained instead of the full weights (None: full fine-tuning). `--set train.lora={}`
    # takes the defaults of `LoraConfig`.
    lora: LoraConfig | None = None

    @model_serializer(mode="wrap")
    def _unset_fields_left_out(self, handler) -> dict[str, Any]:
        return without_unset(without_unset(handler(self), "lora"), "gpus_per_worker")

    @model_validator(mode="after")
    def _prompt_fits(self) -> "TrainConfig":
        if self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be < max_length ({self.max_length})"
            )
        return self

    @model_validator(mode="after")
    def _shared_gpu_has_one_worker(self) -> "TrainConfig":
        if self.gpus_per_worker is not None and self.gpus_per_worker < 1 and self.num_workers > 1:
            raise ValueError(f"gpus_per_worker ({self.gpus_per_worker:g}) below 1 shares a GPU: only with "
                             f"num_workers 1 (got {self.num_workers}), as two NCCL ranks cannot share one")
        return self

    @property
    def worker_gpus(self) -> float:
        """The GPUs each worker reserves in Ray: 0 without use_gpu."""
        return (self.gpus_per_worker or 1.0) if self.use_gpu else 0.0

    @property
    def beta(self) -> float:
        return 1.0 / self.eta

    @property
    def global_batch_size(self) -> int:
        return self.per_device_batch_size * self.gradient_accumulation_steps * self.num_workers


class TrackingConfig(_Strict):
    """MLflow: one parent run per output directory, one nested run per iteration (sppo/tracking.py)."""

    # Used when MLFLOW_TRACKING_URI is not set.
    tracking_uri: str = "http://127.0.0.1:5000"
    # The MLflow experiment, created if missing.
    experiment: str = "sppo"
    # The parent run's name (null: the output directory's name).
    run_name: str | None = None
    # Each iteration's checkpoint becomes a new version of this registered model (None: off).
    register_model: str | None = None
    # The license named in each checkpoint's model card (an SPDX-style id such as apache-2.0, or
    # the base model's, e.g. gemma); None leaves it out.
    license: str | None = None
    # MLflow's system metrics monitor (CPU, memory, disk, network; GPU where the machine has one):
    # the driver's machine as each iteration run's system/* metrics, and every Ray node of the
    # job's start, the engines' and training workers' included, as the parent run's
    # system/<node address>-<node id>/* metrics (sppo/node_metrics.py).
    system_metrics: bool = True
    # How long every MLflow call (the driver's and the training workers') keeps retrying while
    # the tracking server does not answer; past it the job stops, its outputs kept on disk, and
    # re-submitting continues. MLflow's own retries with exponential backoff (sppo/tracking.py).
    outage_limit_s: float = Field(default=240.0, gt=0.0)
    # Each iteration's sample table (samples.json, MLflow's table view) holds this many prompts,
    # with their candidates, win matrix, chosen and rejected: what MLflow receives per iteration
    # stays the same size however many prompts an iteration has. The full data is in the
    # iteration's parquet artifacts. 0: no table.
    sample_table_rows: int = Field(default=200, ge=0)

    @property
    def resolved_uri(self) -> str:
        """MLFLOW_TRACKING_URI wins over the config, as MLflow users expect."""
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri


class TimeoutsConfig(_Strict):
    """Upper bounds on each wait for actors and workers: a dead or stuck one fails the job with its
    role and stage named instead of hanging. Generous defaults for GPU clusters."""

    # Seconds a sampling call (every engine's shard) may take, engine starts included.
    sampling_s: float = Field(default=24 * 3600.0, gt=0.0)
    # Seconds a judging call may take, the judge's start included.
    judging_s: float = Field(default=24 * 3600.0, gt=0.0)
    # Seconds an iteration's training may take (the workers' deadline).
    training_s: float = Field(default=48 * 3600.0, gt=0.0)
    # Seconds one collective of the training workers may wait for its peers, the process group's
    # rendezvous included (capped at training_s). A rank stuck once then fails its worker group,
    # which Ray Train starts again (train.max_failures), instead of holding the stage for training_s.
    # Must exceed tracking.outage_limit_s, which rank 0 may spend in a step's metrics call.
    collective_s: float = Field(default=1800.0, gt=0.0)
    # A job's lease on its output directory (sppo/lease.py) is taken over by another job once
    # its driver has not renewed it for this long (it renews every quarter of it).
    lease_s: float = Field(default=60.0, gt=0.0)
    # A Ray node that leaves the cluster mid-stage: Ray restarts its engines, and Ray Train its
    # workers, on the nodes that are left if they have room; a stage that has not finished this
    # long after the loss fails, naming the node (sppo/cluster.py). Re-submitting continues.
    node_lost_s: float = Field(default=300.0, gt=0.0)
    # A stage whose actors Ray has not placed (the cluster busy with other jobs, or an autoscaler
    # adding nodes) logs what is pending every 30 s, and fails once it has waited this long.
    placement_s: float = Field(default=3600.0, gt=0.0)


class EvalConfig(_Strict):
    """Every iteration, pi_t is judged against pi_0 and pi_{t-1} on the held-out prompts
    (prompts.eval_size / prompts.eval_split; none held out: no evaluation), sampling.k samples
    per prompt and policy. See sppo/evaluation.py."""

    # Bootstrap resamples of the held-out prompts behind each win rate's interval (the
    # length-controlled fit is refitted on each).
    bootstrap_samples: int = Field(default=1000, ge=1)
    # The intervals' level (percentile bootstrap).
    confidence: float = Field(default=0.95, gt=0.0, lt=1.0)
    # Seed of the bootstrap resamples; policy g's held-out samples are drawn with seed + 1000 g.
    seed: int = 0
    # The judge that grades the held-out comparisons, with the fields of `judge`. Unset: the
    # training judge. Another judge: both grade them, and each one's win rates are logged,
    # eval/... by this one and eval/training_judge/... by the one that trained the policy.
    judge: JudgeConfig | None = None

    @model_serializer(mode="wrap")
    def _unset_judge_left_out(self, handler) -> dict[str, Any]:
        return without_unset(handler(self), "judge")


class RunConfig(_Strict):
    # SPPO iterations, each with its own prompt split (`--iters` sets it).
    iterations: int = Field(default=3, ge=1)
    # Where manifest.json, run.json and each iteration's outputs and checkpoint go (`--output-dir`
    # sets it). A relative path is resolved in the driver's working directory, which under
    # `ray job submit --working-dir` is a temporary copy: give an absolute path there.
    output_dir: str = "outputs/sppo"
    # Where the run's outputs live for every node: a shared path (NFS) or a pyarrow.fs URI
    # (s3://bucket/run, gs://...; credentials and endpoints from the usual environment variables).
    # Unset: output_dir, which every node must then see. Set: output_dir is the driver's copy.
    storage_uri: str | None = None
    timeouts: TimeoutsConfig = TimeoutsConfig()
    policy: PolicyConfig = PolicyConfig()
    prompts: PromptsConfig = PromptsConfig()
    sampling: SamplingConfig = SamplingConfig()
    judge: JudgeConfig = JudgeConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("storage_uri")
    @classmethod
    def _plain_uri(cls, uri: str | None) -> str | None:
        if uri is not None and ("?" in uri or not uri.strip("/")):
            raise ValueError(f"storage_uri {uri!r}: give a path or scheme://bucket/path without a query "
                             "(endpoints and credentials come from the environment, e.g. AWS_ENDPOINT_URL)")
        return uri

    @model_validator(mode="after")
    def _enough_splits(self) -> "RunConfig":
        if self.prompts.num_splits < self.iterations:
            raise ValueError(
                f"prompts.num_splits ({self.prompts.num_splits}) must be >= iterations "
                f"({self.iterations}): each iteration needs its own disjoint split"
            )
        return self

    @model_validator(mode="after")
    def _collectives_outlast_a_tracking_outage(self) -> "RunConfig":
        if self.timeouts.collective_s <= self.tracking.outage_limit_s:
            raise ValueError(
                f"timeouts.collective_s ({self.timeouts.collective_s:g}) must exceed tracking.outage_limit_s "
                f"({self.tracking.outage_limit_s:g}): the rank-0 training worker waits out an MLflow outage in "
                "a step's metrics call while the other workers wait for it in the next collective"
            )
        return self

    @model_validator(mode="after")
    def _sampler_reference_is_on_policy(self) -> "RunConfig":
        if self.train.reference_logps == "sampler" and self.prompts.response_column is not None:
            raise ValueError(
                "train.reference_logps 'sampler' needs every candidate sampled from pi_t, but "
                f"prompts.response_column ({self.prompts.response_column!r}) adds the dataset's own "
                "responses, which have no sampler log-probs: use reference_logps 'policy'"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted-key view, e.g. {"train.eta": 1000.0}: MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, sub in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, sub)
            else:
                out[prefix] = value

        walk("", self.model_dump())
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(), sort_keys=False)

    def digest(self, *sections: str) -> str:
        """Stable hash of the named sections (all when none): detects config drift on resume."""
        data = self.model_dump()
        if sections:
            data = {s: data[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A YAML mapping that holds the same key twice (PyYAML would silently keep the last)."""

    def __init__(self, key: Any, first: yaml.Mark, again: yaml.Mark):
        super().__init__(None, None, f"key {key!r} appears twice in the same mapping "
                         f"(line {first.line + 1} and line {again.line + 1})", again)
        self.key, self.first_line, self.line = key, first.line + 1, again.line + 1


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses duplicate keys, at every nesting level."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` may be overridden, by design
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in seen:
                    raise DuplicateKeyError(key, seen[key], key_node.start_mark)
                seen[key] = key_node.start_mark
            except TypeError:  # unhashable: SafeLoader's own error follows
                continue
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if child is None:  # an optional section turned off (`lora: null`) that the override turns on
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.learning_rate=1e-6' -> ("train.learning_rate", 1e-06); values are YAML scalars."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-6")
    try:
        value = _load_yaml(raw) if raw.strip() else raw
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML: {err}") from err
    return key.strip(), value


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read, merge overrides into, and validate a run config. Raises ConfigError."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ConfigError(f"config file {path}: cannot read ({err.strerror})") from err
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line, column = data.count(b"\n", 0, err.start) + 1, err.start - data.rfind(b"\n", 0, err.start)
            raise ConfigError(f"config file {path}: not UTF-8 text (byte 0x{data[err.start]:02x} at line {line}, "
                              f"column {column})") from err
        try:
            loaded = _load_yaml(text)
        except DuplicateKeyError as err:
            raise ConfigError(f"config file {path}: key {err.key!r} is given twice in the same mapping, "
                              f"at line {err.first_line} and again at line {err.line}; keep one") from err
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file {path}: malformed YAML{where}: "
                              f"{getattr(err, 'problem', None) or err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping of sections")
        tree = loaded or {}
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        where = f"config file {path}" if path else "config"
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in err.errors()
        )
        raise ConfigError(f"{where}: {problems}") from err
