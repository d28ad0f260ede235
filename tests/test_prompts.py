import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sppo.config import PromptsConfig
from sppo.prompts import PromptSourceError, iteration_prompts, load_prompts, split_prompts


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
    first = [iteration_prompts(cfg, t) for t in (1, 2, 3)]
    again = [iteration_prompts(cfg, t) for t in (1, 2, 3)]
    assert first == again
    assert all(len(p) == 40 for p in first)
    assert not set(first[0]) & set(first[1]) and not set(first[1]) & set(first[2])
    assert iteration_prompts(cfg.model_copy(update={"seed": 7}), 1) != first[0]


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
