"""Bad input is refused before any compute, in one line that names what is wrong.

Each case is `python -m sppo.run` (its `main`, in this process) on the tiny config with one
thing wrong: a config value, a flag, a prompt file, a model directory, the judge, the output
directory's state or the tracking settings. Each must exit 2 with exactly one line on stderr,
`error: ...`, naming the field or file (and line or row); no traceback; and nothing written or
changed: not the output directory, not the MLflow store, not the input files. The control case
(the same inputs with nothing wrong, through `--plan`) passes every check, so each case fails
for its own fault alone. docs/reliability.md's bad-input table lists them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sppo.run import main
from tests.fake_hub import fake_hub

REPO = Path(__file__).resolve().parents[1]
LONG = "word " * 400  # far over the tiny config's 96-token prompt limit


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _prompts(n: int, prefix: str = "tell me about") -> list[dict]:
    return [{"prompt": f"{prefix} topic number {i}"} for i in range(n)]


def _policy_copy(tiny_policy_dir: str, tmp: Path, damage) -> str:
    target = tmp / "policy"
    shutil.copytree(tiny_policy_dir, target)
    damage(target)
    return str(target)


def _saved_dataset(tmp: Path, splits: dict[str, list[str]]) -> str:
    import datasets

    path = tmp / "saved"
    datasets.DatasetDict({name: datasets.Dataset.from_dict({"prompt": texts}) for name, texts in splits.items()}
                         ).save_to_disk(str(path))
    return str(path)


def _closed_port() -> int:
    from sppo.devtools.localstack import free_port

    return free_port()  # nothing listens on it


# id -> (setup(tmp, policy_dir) -> extra argv, text the one error line must contain)
CASES = {
    # config values
    "k below 2": (lambda t, p: ["--set", "sampling.k=1"], "sampling.k: Input should be greater than or equal to 2"),
    "negative temperature": (lambda t, p: ["--set", "sampling.temperature=-1"], "sampling.temperature"),
    "top_p of 0": (lambda t, p: ["--set", "sampling.top_p=0"], "sampling.top_p"),
    "unknown engine dtype": (lambda t, p: ["--set", "sampling.dtype=fp8"], "sampling.dtype"),
    "unknown engine mode": (lambda t, p: ["--set", "sampling.engine_mode=forever"], "sampling.engine_mode"),
    "learning rate not a number": (lambda t, p: ["--set", "train.learning_rate=abc"], "train.learning_rate"),
    "unknown loss": (lambda t, p: ["--set", "train.loss=ppo"], "train.loss"),
    "prompt limit over sequence limit": (lambda t, p: ["--set", "train.max_prompt_length=500"],
                                         "max_prompt_length (500) must be < max_length (160)"),
    "unknown judge kind": (lambda t, p: ["--set", "judge.kind=gpt4"], "judge.kind"),
    "unknown field": (lambda t, p: ["--set", "sampling.kk=3"], "sampling.kk: Extra inputs are not permitted"),
    "fewer splits than iterations": (lambda t, p: ["--set", "prompts.num_splits=2"],
                                     "prompts.num_splits (2) must be >= iterations (3)"),
    "storage uri with a query": (lambda t, p: ["--set", "storage_uri=s3://bucket/run?region=x"], "storage_uri"),
    "override without a value": (lambda t, p: ["--set", "sampling.k"], "expected KEY=VALUE"),
    "zero iterations": (lambda t, p: ["--iters", "0"], "iterations: Input should be greater than or equal to 1"),
    # config files and flags
    "missing config file": (lambda t, p: ["--config", str(t / "nope.yaml")], "nope.yaml: cannot read"),
    "malformed yaml": (lambda t, p: ["--config", _write(t / "bad.yaml", "sampling: [k: 4\n")], "malformed YAML"),
    "yaml that is a list": (lambda t, p: ["--config", _write(t / "list.yaml", "- 1\n- 2\n")],
                            "top level must be a mapping"),
    "resume from 0": (lambda t, p: ["--resume-from", "0"], "--resume-from 0: must be between 1"),
    "resume without the checkpoint": (lambda t, p: ["--resume-from", "2"], "iteration 1's checkpoint"),
    # config file contents: bytes, repeated keys, non-finite numbers
    "config file not UTF-8": (
        lambda t, p: ["--config", _write_bytes(t / "latin1.yaml", b"iterations: 3\n# caf\xe9\n")],
        "latin1.yaml: not UTF-8 text (byte 0xe9 at line 2, column 6)"),
    "key twice in a section": (
        lambda t, p: ["--config", _write(t / "twice.yaml", _tiny_with("  eta: 30\n", after="train:"))],
        "twice.yaml: key 'eta' is given twice in the same mapping, at line "),
    "section twice": (lambda t, p: ["--config", _write(t / "twice.yaml", _tiny_with("sampling:\n  k: 3\n"))],
                      "twice.yaml: key 'sampling' is given twice"),
    "infinite eta": (lambda t, p: ["--set", "train.eta=.inf"], "train.eta: Input should be a finite number"),
    "nan in a float of a mapping": (lambda t, p: ["--set", "judge.rule.weights={letters: .nan}"],
                                    "judge.rule.weights.letters: Input should be a finite number"),
    # where the prompts went, when an iteration keeps too few
    "held-out set takes every prompt": (lambda t, p: _source(_jsonl(t / "p.jsonl", _prompts(12)))
                                        + ["--set", "prompts.eval_size=12"],
                                        "the held-out set takes 12 (prompts.eval_size); none are left for the 3 splits"),
    "splits too small for one batch": (lambda t, p: _source(_jsonl(t / "p.jsonl", _prompts(60)))
                                       + ["--set", "prompts.eval_size=0", "--set", "prompts.num_splits=20"],
                                       "the other 60 are cut into 20 splits (prompts.num_splits) of 3"),
    # prompt files
    "jsonl line that is not json": (lambda t, p: _source(_write(t / "p.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n')),
                                    "p.jsonl, line 2: not valid JSON"),
    "jsonl line that is not an object": (lambda t, p: _source(_write(t / "p.jsonl", '{"prompt": "a"}\n["b"]\n')),
                                         "p.jsonl, line 2: expected a JSON object, got a list"),
    "jsonl prompt that is not a string": (lambda t, p: _source(_jsonl(t / "p.jsonl", [{"prompt": "a"}, {"prompt": 7}])),
                                          "row 1 of column 'prompt' (prompts.column) holds a int, not a string"),
    "jsonl without the column": (lambda t, p: _source(_jsonl(t / "p.jsonl", [{"text": "a"}])),
                                 "no column 'prompt' (prompts.column)"),
    "jsonl of empty prompts": (lambda t, p: _source(_jsonl(t / "p.jsonl", [{"prompt": " "}, {"prompt": None}])),
                               "no non-empty prompts"),
    "jsonl that is not text": (lambda t, p: _source(_write_bytes(t / "p.jsonl", b"\xff\xfe\x00bad")), "cannot read"),
    "corrupt parquet": (lambda t, p: _source(_write(t / "p.parquet", "PAR1 not really")),
                        "p.parquet: not a readable parquet file"),
    "parquet without the column": (lambda t, p: _source(_parquet(t / "p.parquet", {"text": ["a"]})),
                                   "no column 'prompt' (prompts.column)"),
    "parquet of numbers": (lambda t, p: _source(_parquet(t / "p.parquet", {"prompt": [1, 2]})),
                           "row 0 of column 'prompt' (prompts.column) holds a int"),
    "directory that is no saved dataset": (lambda t, p: _source(_mkdir(t / "notadataset")),
                                           "not a readable saved-dataset directory"),
    "saved dataset without the split": (lambda t, p: _source(_saved_dataset(t, {"test": ["a", "b"]})),
                                        "no split 'train' (prompts.split)"),
    "unsupported file type": (lambda t, p: _source(_write(t / "p.csv", "prompt\na\n")), "p.csv: unsupported"),
    "missing prompt file": (lambda t, p: _source(str(t / "gone.jsonl")), "gone.jsonl does not exist"),
    "unknown built-in set": (lambda t, p: ["--set", "prompts.source=builtin:huge"], "unknown built-in set"),
    "too few prompts for one batch": (lambda t, p: _source(_jsonl(t / "p.jsonl", _prompts(12)))
                                      + ["--set", "prompts.eval_size=0"], "iteration 1 keeps 4 prompts"),
    "every prompt too long": (lambda t, p: _source(_jsonl(t / "p.jsonl", _prompts(60, LONG))),
                              "longer than train.max_prompt_length tokens"),
    "every held-out prompt too long": (
        lambda t, p: ["--set", "prompts.source=" + _saved_dataset(t, {
            **{f"train_iteration_{i}": [f"short prompt {i} {n}" for n in range(16)] for i in (1, 2, 3)},
            "test": [LONG + "a", LONG + "b"]}),
            "--set", "prompts.split=train_iteration_{t}", "--set", "prompts.eval_split=test"],
        "all 2 held-out prompts"),
    "responses from the built-in set": (lambda t, p: ["--set", "prompts.response_column=response"],
                                        "the built-in prompt set 'builtin:tiny' holds no responses"),
    "response cell of the wrong type": (
        lambda t, p: _source(_jsonl(t / "p.jsonl", [{"prompt": f"q{i}", "r": 5} for i in range(60)]))
        + ["--set", "prompts.response_column=r"],
        "column 'r' (prompts.response_column), row 0"),
    # model directories
    "policy directory missing": (lambda t, p: ["--set", f"policy.path={t / 'nope'}"], "no config.json"),
    "policy config not json": (lambda t, p: ["--set", "policy.path=" + _policy_copy(
        p, t, lambda d: (d / "config.json").write_text("{not json"))], "config.json is not readable JSON"),
    "policy weights corrupt": (lambda t, p: ["--set", "policy.path=" + _policy_copy(
        p, t, lambda d: (d / "model.safetensors").write_bytes(b"\x10\x00garbage"))],
        "model.safetensors is not a readable safetensors file"),
    "policy without weights": (lambda t, p: ["--set", "policy.path=" + _policy_copy(
        p, t, lambda d: (d / "model.safetensors").unlink())], "holds no weights"),
    "policy without a tokenizer": (lambda t, p: ["--set", "policy.path=" + _policy_copy(
        p, t, _drop_tokenizer)], "has no loadable tokenizer"),
    "policy without a chat template": (lambda t, p: ["--set", "policy.path=" + _policy_copy(
        p, t, _drop_chat_template)], "has no chat template"),
    "judge directory missing": (lambda t, p: ["--set", "judge.kind=pairrm", "--set", f"judge.path={t / 'nope'}"],
                                "judge.path"),
    # the judge's settings
    "reward judge with the PairRM path": (lambda t, p: ["--set", "judge.kind=reward_model"],
                                          "judge.kind 'reward_model' needs a reward model"),
    "PairRM judge with a reward model": (lambda t, p: ["--set", "judge.kind=pairrm", "--set", "judge.path=tiny:reward"],
                                         "judge.kind 'pairrm' needs a PairRM model"),
    "evaluation judge of an unknown kind": (lambda t, p: ["--set", "eval.judge.kind=gpt4"], "eval.judge.kind"),
    "evaluation PairRM judge with a reward model": (
        lambda t, p: ["--set", "eval.judge.kind=pairrm", "--set", "eval.judge.path=tiny:reward"],
        "eval.judge.path: eval.judge.kind 'pairrm' needs a PairRM model"),
    "evaluation judge directory missing": (
        lambda t, p: ["--set", "eval.judge.kind=reward_model", "--set", f"eval.judge.path={t / 'nope'}"],
        "eval.judge.path"),
    # the output directory's state
    "output directory is a file": (lambda t, p: _out(_write(t / "file", "x")), "is a file, not a directory"),
    "corrupt manifest": (lambda t, p: _out(_state(t, "manifest.json", "{oops")), "manifest.json: not readable JSON"),
    "manifest of another shape": (lambda t, p: _out(_state(t, "manifest.json", "[]")),
                                  "manifest.json: not a manifest.json written by sppo"),
    "run record of another shape": (lambda t, p: _out(_state(t, "run.json", '{"run": 1}')),
                                    "run.json: not a run.json written by sppo"),
    "changed lineage": (lambda t, p: _out(_state(t, "manifest.json", json.dumps(
        {"lineage": {"sampling.k": 2}, "iterations": {}}))), "the config changes what earlier iterations"),
    # tracking
    "tracking uri of an unknown scheme": (lambda t, p: ["--set", "tracking.tracking_uri=ftp://mlflow.example"],
                                          "has the scheme 'ftp'"),
    "tracking server that does not answer": (
        lambda t, p: ["--set", f"tracking.tracking_uri=http://127.0.0.1:{_closed_port()}"], "is not reachable"),
    "empty experiment name": (lambda t, p: ["--set", "tracking.experiment=''"], "tracking.experiment"),
    "registered model name MLflow refuses": (lambda t, p: ["--set", "tracking.register_model=team/sppo"],
                                             "tracking.register_model: Invalid model name 'team/sppo'"),
    # an output directory tracked elsewhere; model specs that are neither a path here nor a hub id
    "run record of another tracking server": (lambda t, p: _out(_state(t, "run.json", json.dumps(
        {"parent_run_id": "0a1b", "experiment_id": "1", "tracking_uri": "http://127.0.0.1:5999"}))),
        "run.json: this output directory was tracked at http://127.0.0.1:5999, not sqlite:///"),
    "relative policy directory without ./": (lambda t, p: ["--set", "policy.path=sppo/tiny"],
                                             "policy.path: sppo/tiny is not a readable model directory"),
    "policy neither a path nor a hub id": (
        lambda t, p: ["--set", "policy.path=no-such-dir/run/iter-1/checkpoint"],
        "policy.path: 'no-such-dir/run/iter-1/checkpoint' is neither a path that exists here nor a Hugging Face"),
    "judge neither a path nor a hub id": (lambda t, p: ["--set", "judge.kind=pairrm", "--set", "judge.path=my judge"],
                                          "judge.path: 'my judge' is neither a path"),
    "strict without plan": (lambda t, p: ["--strict"], "--strict: only with --plan"),
}


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _tiny_with(lines: str, after: str | None = None) -> str:
    """configs/tiny.yaml with `lines` added after the line `after` (None: at the end)."""
    text = (REPO / "configs" / "tiny.yaml").read_text()
    if after is None:
        return text + lines
    head, sep, tail = text.partition(f"\n{after}\n")
    assert sep, after
    return head + sep + lines + tail


def _write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def _mkdir(path: Path) -> str:
    path.mkdir()
    (path / "junk.txt").write_text("not a dataset")
    return str(path)


def _parquet(path: Path, columns: dict) -> str:
    pq.write_table(pa.table(columns), path)
    return str(path)


def _source(path: str) -> list[str]:
    return ["--set", f"prompts.source={path}"]


def _out(path: str) -> list[str]:
    return ["--output-dir", path]


def _state(tmp: Path, name: str, text: str) -> str:
    out = tmp / "existing-run"
    out.mkdir(exist_ok=True)
    (out / name).write_text(text)
    return str(out)


def _drop_tokenizer(directory: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (directory / name).unlink(missing_ok=True)


def _drop_chat_template(directory: Path) -> None:
    (directory / "chat_template.jinja").unlink(missing_ok=True)
    config = directory / "tokenizer_config.json"
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """An MLflow store in tmp_path (a sqlite file that must not appear) and no inherited settings."""
    store = tmp_path / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(REPO)
    return store


def _run(argv: list[str], capsys) -> tuple[int, list[str]]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_before_anything_is_written(case, tmp_path, isolated, tiny_policy_dir, capsys,
                                                          monkeypatch):
    setup, expected = CASES[case]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    extra = setup(inputs, tiny_policy_dir)
    if any(arg.startswith("tracking.tracking_uri=") for arg in extra):
        monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the config's URI is the one at fault
    argv = ["--config", "configs/tiny.yaml", "--output-dir", str(tmp_path / "out"), *extra]
    capsys.readouterr()  # what making the inputs printed
    before = _snapshot(tmp_path)
    code, lines = _run(argv, capsys)
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert expected in lines[0], lines[0]
    assert _snapshot(tmp_path) == before  # no output directory, no MLflow store, inputs untouched
    assert not isolated.exists()


HUB_REFUSALS = {  # model spec (on the fake hub), token -> the error line contains
    ("policy.path=org/missing", None): "policy.path: the Hugging Face hub has no model org/missing (or it is private",
    ("policy.path=org/gated", None): "policy.path: org/gated is a gated model and no Hugging Face token is set here",
    ("judge.path=org/gated", "hf_fake"): "judge.path: org/gated is a gated model and this token's account has not",
}


@pytest.mark.parametrize("spec, token", sorted(HUB_REFUSALS, key=str))
def test_a_hub_model_the_hub_refuses_is_one_line(spec, token, tmp_path, tmp_path_factory, isolated, capsys,
                                                 monkeypatch):
    """Where the hub answers, its refusal is the run's, before anything is written; only its
    access check is asked for, nothing is downloaded."""
    judge = ["--set", "judge.kind=pairrm"] if spec.startswith("judge.") else []
    before = _snapshot(tmp_path)
    with fake_hub(monkeypatch, tmp_path_factory.mktemp("hf"), token) as asked:
        code, lines = _run(["--config", "configs/tiny.yaml", "--output-dir", str(tmp_path / "out"), *judge,
                            "--set", spec], capsys)
    assert code == 2 and len(lines) == 1 and HUB_REFUSALS[spec, token] in lines[0], lines
    assert f"/api/models/{spec.split('=')[1]}/auth-check" in asked and not any("/resolve/" in p for p in asked)
    assert _snapshot(tmp_path) == before and not isolated.exists()


def test_the_control_case_passes_every_check(tmp_path, isolated, capsys):
    code, lines = _run(["--config", "configs/tiny.yaml", "--output-dir", str(tmp_path / "out"), "--plan",
                        "--node", "CPU=3"], capsys)
    assert code == 0, lines
    assert not (tmp_path / "out").exists() and not isolated.exists()


def test_plan_runs_the_same_checks(tmp_path, isolated, capsys):
    code, lines = _run(["--config", "configs/tiny.yaml", "--output-dir", str(tmp_path / "out"), "--plan",
                        "--node", "CPU=3", "--set", "judge.kind=reward_model"], capsys)
    assert code == 2 and len(lines) == 1 and "judge.kind 'reward_model' needs a reward model" in lines[0]


def test_a_fixed_input_then_runs_its_checks_clean_in_the_same_directory(tmp_path, isolated, capsys):
    """Nothing was recorded by the refused run, so the corrected one is not refused as another lineage."""
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n')
    out = tmp_path / "out"
    code, _ = _run(["--config", "configs/tiny.yaml", "--output-dir", str(out), "--set", f"prompts.source={bad}"],
                   capsys)
    assert code == 2 and not out.exists()
    code, lines = _run(["--config", "configs/tiny.yaml", "--output-dir", str(out), "--plan", "--node", "CPU=3"],
                       capsys)
    assert code == 0, lines
