import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sppo.config import PromptsConfig
from sppo.prompts import (
    PromptSourceError,
    heldout_prompts,
    iteration_prompts,
    load_prompts,
    prompt_length_filter,
    split_prompts,
)


def test_bundled_set_is_large_distinct_and_nonempty():
    prompts = load_prompts(PromptsConfig())
    assert len(prompts) >= 300
    assert len(set(prompts)) == len(prompts)
    assert all(p.strip() for p in prompts)


@pytest.mark.parametrize("n, parts", [(10, 3), (441, 3), (7, 7), (5, 8)])
def test_splits_are_disjoint_and_cover_everything(n, parts):
    prompts = [f"p{i}" for i in range(n)]
    splits = split_prompts(prompts, parts, seed=1)
    assert len(splits) == parts
    flat = [p for s in splits for p in s]
    assert sorted(flat) == sorted(prompts)
    assert max(map(len, splits)) - min(map(len, splits)) <= 1


def test_iteration_prompts_are_reproducible_and_disjoint():
    cfg = PromptsConfig(per_iteration=40)
    first = [iteration_prompts(cfg, t).prompts for t in (1, 2, 3)]
    again = [iteration_prompts(cfg, t).prompts for t in (1, 2, 3)]
    assert first == again
    assert all(len(p) == 40 for p in first)
    assert not set(first[0]) & set(first[1]) and not set(first[1]) & set(first[2])
    assert iteration_prompts(cfg.model_copy(update={"seed": 7}), 1).prompts != first[0]


def test_local_files_dedupe_and_drop_empty(tmp_path):
    rows = [{"instruction": "a"}, {"instruction": "a"}, {"instruction": "  "}, {"instruction": "b"}]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_prompts(PromptsConfig(source=str(jsonl), column="instruction")) == ["a", "b"]
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    assert load_prompts(PromptsConfig(source=str(parquet), column="instruction")) == ["a", "b"]


def test_bad_sources_name_the_file_or_column(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"text": "x"}))
    with pytest.raises(PromptSourceError, match="no column 'prompt'"):
        load_prompts(PromptsConfig(source=str(jsonl)))
    with pytest.raises(PromptSourceError, match="does not exist"):
        load_prompts(PromptsConfig(source=str(tmp_path / "nope.jsonl")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": ""}))
    with pytest.raises(PromptSourceError, match="no non-empty prompts"):
        load_prompts(PromptsConfig(source=str(empty)))


def _save_dataset(path, splits: dict[str, list[dict]]):
    import datasets

    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(path)
    )


def test_saved_dataset_with_ready_iteration_splits(tmp_path):
    # The schema of snorkelai/Snorkel-Mistral-PairRM-DPO-Dataset: splits train_iteration_{1,2,3}, column prompt.
    splits = {f"train_iteration_{t}": [{"prompt": f"t{t}-{i}", "chosen": "c"} for i in range(5)] for t in (1, 2, 3)}
    splits["test_iteration_1"] = [{"prompt": "held out", "chosen": "c"}]
    _save_dataset(tmp_path / "snorkel", splits)
    cfg = PromptsConfig(source=str(tmp_path / "snorkel"), split="train_iteration_{t}")
    assert iteration_prompts(cfg, 2).prompts == [f"t2-{i}" for i in range(5)]
    with pytest.raises(PromptSourceError, match="no split 'train_iteration_4'.*prompts.split"):
        iteration_prompts(cfg, 4)


def test_saved_dataset_per_iteration_sources_and_ultrafeedback_column(tmp_path):
    # UCLA-AGI/data-mistral-7b-instruct-sppo-iter{t}: one dataset per iteration, column prompt.
    for t in (1, 2):
        _save_dataset(tmp_path / f"sppo-iter{t}", {"train": [{"prompt": f"iter{t}-{i}"} for i in range(3)]})
    cfg = PromptsConfig(source=str(tmp_path / "sppo-iter{t}"))
    assert iteration_prompts(cfg, 2).prompts == ["iter2-0", "iter2-1", "iter2-2"]
    # openbmb/UltraFeedback: one train split, column instruction, cut into disjoint parts here.
    _save_dataset(tmp_path / "uf", {"train": [{"instruction": f"q{i}", "models": ["m"]} for i in range(9)]})
    uf = PromptsConfig(source=str(tmp_path / "uf"), column="instruction", num_splits=3)
    parts = [iteration_prompts(uf, t).prompts for t in (1, 2, 3)]
    assert sorted(p for part in parts for p in part) == sorted(f"q{i}" for i in range(9))
    with pytest.raises(PromptSourceError, match="no column 'prompt'.*instruction"):
        load_prompts(PromptsConfig(source=str(tmp_path / "uf")))


def test_heldout_prompts_never_reach_training():
    cfg = PromptsConfig(eval_size=30)
    heldout = set(heldout_prompts(cfg))
    assert len(heldout) == 30
    training = [p for t in (1, 2, 3) for p in iteration_prompts(cfg, t).prompts]
    assert not heldout & set(training)
    assert len(training) + len(heldout) == len(load_prompts(cfg))


def test_ready_splits_drop_prompts_of_the_eval_split(tmp_path):
    splits = {"train_iteration_1": [{"prompt": p} for p in ["a", "b", "shared"]],
              "test_iteration_1": [{"prompt": p} for p in ["shared", "z"]]}
    _save_dataset(tmp_path / "ds", splits)
    cfg = PromptsConfig(source=str(tmp_path / "ds"), split="train_iteration_{t}", eval_split="test_iteration_1")
    selection = iteration_prompts(cfg, 1)
    assert selection.prompts == ["a", "b"]
    assert selection.counts["heldout_dropped"] == 1 and selection.counts["heldout"] == 2


def test_eval_size_samples_the_eval_split_of_ready_splits(tmp_path):
    """The production SPPO configs judge all 994 prompts of test_iteration_1; eval_size, which used
    to be ignored there, now takes a seeded sample of it (a cheaper evaluation per iteration)."""
    heldout_split = [f"h{i}" for i in range(20)]
    splits = {"train_iteration_1": [{"prompt": p} for p in ["a", "b", "h3", "h4"]],
              "test_iteration_1": [{"prompt": p} for p in heldout_split]}
    _save_dataset(tmp_path / "ds", splits)
    whole = PromptsConfig(source=str(tmp_path / "ds"), split="train_iteration_{t}", eval_split="test_iteration_1")
    assert heldout_prompts(whole) == heldout_split
    sampled = whole.model_copy(update={"eval_size": 5})
    chosen = heldout_prompts(sampled)
    assert len(chosen) == 5 and set(chosen) <= set(heldout_split) and chosen == heldout_prompts(sampled)
    assert chosen != heldout_prompts(sampled.model_copy(update={"seed": 7}))
    trained = iteration_prompts(sampled, 1).prompts
    assert not set(chosen) & set(trained) and {"a", "b"} <= set(trained)


@pytest.mark.parametrize(("fields", "message"), [
    ({"split": "train_iteration_{t}", "eval_size": 8}, r"eval_size \(8\) with ready-made splits .* needs eval_split"),
    ({"eval_split": "test"}, r"eval_split \('test'\) is for ready-made splits only"),
])
def test_a_held_out_set_that_names_nothing_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        PromptsConfig(**fields)


def test_counts_and_length_filter(tmp_path, tiny_policy_dir):
    from transformers import AutoTokenizer

    rows = [{"prompt": "short one"}, {"prompt": "short one"}, {"prompt": ""}, {"prompt": "word " * 200},
            {"prompt": "Reply with None if there is None."}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = PromptsConfig(source=str(path), num_splits=1)
    too_long = prompt_length_filter(AutoTokenizer.from_pretrained(tiny_policy_dir), max_prompt_length=64)
    selection = iteration_prompts(cfg, 1, too_long=too_long)
    assert sorted(selection.prompts) == ["Reply with None if there is None.", "short one"]
    assert selection.counts == {"source_rows": 5, "empty_dropped": 1, "duplicates_dropped": 1,
                                "heldout_dropped": 0, "too_long_dropped": 1, "selected": 2, "heldout": 0}
    with pytest.raises(PromptSourceError, match="all 3 prompts of iteration 1 are longer than train.max_prompt_length"):
        iteration_prompts(cfg, 1, too_long=prompt_length_filter(AutoTokenizer.from_pretrained(tiny_policy_dir), 2))


def test_heldout_prompts_are_length_filtered_like_training_prompts():
    cfg = PromptsConfig(eval_size=40)
    plain = heldout_prompts(cfg)
    filtered = heldout_prompts(cfg, too_long=lambda prompt: len(prompt) > 60)
    assert filtered == [p for p in plain if len(p) <= 60] and 0 < len(filtered) < len(plain)
    with pytest.raises(PromptSourceError, match="all 40 held-out prompts"):
        heldout_prompts(cfg, too_long=lambda prompt: True)


def _jsonl_source(path, prompts: list[str]) -> str:
    path.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts))
    return str(path)


def test_the_log_line_names_each_reason_prompts_were_left_out(tmp_path):
    long = ["x" * 80, "y" * 80]
    prompts = [f"prompt {i}" for i in range(40)] + long + ["prompt 3", "prompt 4", "prompt 4", " "]
    cfg = PromptsConfig(source=_jsonl_source(tmp_path / "p.jsonl", prompts), num_splits=1, eval_size=6,
                        per_iteration=10)
    selection = iteration_prompts(cfg, 1, too_long=lambda p: len(p) > 60)
    too_long = len(set(long) - set(heldout_prompts(cfg)))  # 42 distinct, 6 held out, 36 in the split
    assert selection.summary(1, 96) == (
        f"iteration 1: 10 prompts; left out {too_long} too long (> train.max_prompt_length=96 tokens), 1 empty, "
        f"3 duplicates, 6 held out, {36 - too_long - 10} over prompts.per_iteration=10")
    plain = iteration_prompts(PromptsConfig(source=cfg.source, num_splits=1), 1)
    assert plain.summary(1, 96) == "iteration 1: 42 prompts; left out 1 empty, 3 duplicates"
    assert iteration_prompts(PromptsConfig(eval_size=0), 1).summary(1, 96).endswith("; none left out")


def test_ready_splits_log_only_their_own_held_out_prompts(tmp_path):
    _save_dataset(tmp_path / "ds", {"train_iteration_1": [{"prompt": p} for p in ["a", "b", "shared", "b"]],
                                    "test": [{"prompt": p} for p in ["shared", "z", "y"]]})
    cfg = PromptsConfig(source=str(tmp_path / "ds"), split="train_iteration_{t}", eval_split="test")
    assert iteration_prompts(cfg, 1).summary(1, 96) == "iteration 1: 2 prompts; left out 1 duplicate, 1 held out"
    assert iteration_prompts(cfg, 1).shortage(1, 96) == (
        "iteration 1's split has 4 prompts (1 duplicate dropped); 1 of them are held out (prompts.eval_split)")


def test_an_iteration_left_empty_by_the_held_out_set_is_not_blamed_on_length(tmp_path):
    cfg = PromptsConfig(source=_jsonl_source(tmp_path / "p.jsonl", [f"q{i}" for i in range(12)]), eval_size=12)
    selection = iteration_prompts(cfg, 1, too_long=lambda p: False)  # once: "all 0 prompts ... are longer"
    assert selection.prompts == []
    assert selection.shortage(1, 96) == ("the source has 12 prompts; the held-out set takes 12 (prompts.eval_size); "
                                         "none are left for the 3 splits (prompts.num_splits)")
    small = PromptsConfig(source=cfg.source, num_splits=5, per_iteration=1)
    assert iteration_prompts(small, 1, too_long=lambda p: p == "q0").shortage(1, 64).startswith(
        "the source has 12 prompts; the held-out set takes 0 (prompts.eval_size); the other 12 are cut into 5 "
        "splits (prompts.num_splits) of 2 or 3, iteration 1's of 3; ")
