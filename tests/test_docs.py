"""The docs say what the code does: README.md, docs/*.md, ray_jobs/README.md and infra/README.md
are read as a new user would, and every name in them that the code defines is looked up.

What `drift` checks, and in which form the docs must write it to be checked:

- repository paths: a path under one of the repository's top-level directories (`sppo/...`,
  `tests/...`, `docs/...`, `configs/...`, ...; `{a,b}` expanded, `*` globbed), a bare or partial
  `*.py` name (it must end some file's path), and every relative markdown link (its `#anchor`
  too, as GitHub makes heading anchors). Paths with placeholders (`<...>`) are not checked;
  files a user creates or a run writes are listed in NOT_IN_THE_REPOSITORY.
- test ids: `tests/test_x.py::name` or `test_x.py::name` (a `[param]` suffix is dropped): the
  file exists and defines a function or class of that name.
- CLI flags: in a code span or code block, every `--flag` after `-m sppo...`, `-m ray_jobs...`
  or `-m bench...` up to the end of that command (`--`, `|`, `;`, `&&`, a comment) must be one
  of that module's argparse flags; a code span that is a bare flag (`--resume-from N`) must be a
  flag of one of the project's CLIs or of the outside tools in EXTERNAL_FLAGS.
- config fields: every dotted name that starts with a section of the run config
  (`sampling.engine_fallback`, `train.lora.rank`, `timeouts.placement_s`, `eval.judge.*`) must be
  a field of `sppo.config.RunConfig`'s schema; names in NOT_CONFIG_FIELDS are other things.
- make targets: in a code span or block, `make [VAR=value ...] TARGET` names a Makefile target.
- bench figures: a top-level key of bench/results/latest.json written as `` `key` 2.51 ``,
  `` `key` **2.51** ``, `` `key` = **2.51** `` or `` `key` = 308.4 / 123.0 = **2.51** `` must equal
  the file's value at the decimals quoted. Figures in other forms (a table's "**3.30x**") are not
  checked.

`test_each_kind_of_drift_is_caught` plants one of each in a small text and asserts it is
reported. Besides: docs/config-reference.md is generated from the schema (`python -m
sppo.config_reference`) and must equal what it generates now; README's list of `python -m
sppo.run`'s flags is complete; docs/reliability.md's bad-input table is tests/test_bad_input.py's
cases; and docs/guides.md's examples (a prompt file, a run copied down from its storage) work.
"""

from __future__ import annotations

import ast
import glob
import itertools
import json
import re
import typing
from functools import cache
from pathlib import Path

import pytest
from pydantic import BaseModel

from sppo.config import RunConfig

REPO = Path(__file__).resolve().parents[1]
DOCS = sorted([REPO / "README.md", *REPO.glob("docs/*.md"), REPO / "ray_jobs" / "README.md",
               REPO / "infra" / "README.md"])
TOP_DIRS = ("sppo", "tests", "docs", "configs", "bench", "infra", "ray_jobs", "requirements", ".ci")
# Paths the docs name that are not in the repository, on purpose.
NOT_IN_THE_REPOSITORY = {
    "infra/mlflow/.env",  # the user's copy of .env.example, git-ignored
    "bench/results/scale.json",  # written by `python -m bench --only scale,checkpoint`, git-ignored
}
# Dotted names that start like a config field and are something else.
NOT_CONFIG_FIELDS = {
    "sampling.engine_mode_used",  # the MLflow parameter recording the mode a job used
    "policy.input",  # the MLflow parameter recording the policy an iteration started from
    "sampling.kk",  # the unknown field of the bad-input examples
}
# Flags of outside tools that the docs write as bare code spans.
EXTERNAL_FLAGS = {
    "--durations", "--dist",  # pytest, pytest-xdist
    "--serve-artifacts",  # mlflow server
    "--runtime-env-json",  # ray job submit
    "--extra-index-url",  # pip
    "--compile-bytecode",  # uv pip install
    "--err",  # ray logs actor
}
FILE_SUFFIXES = (".py", ".md", ".yaml", ".yml", ".json", ".jsonl", ".parquet", ".png", ".log", ".lock", ".txt",
                 ".toml", ".safetensors", ".db")

FENCE = re.compile(r"^\s*```.*?$(.*?)^\s*```\s*$", re.M | re.S)
SPAN = re.compile(r"`([^`]+)`")  # a span may wrap onto the next line, not past a blank one
LINK = re.compile(r"\[[^\]\n]*\]\(([^)\s]+)\)")
TOP_PATH = re.compile(r"(?<![\w./~$-])((?:%s)/[\w./{},*+-]*[\w*}])" % "|".join(re.escape(d) for d in TOP_DIRS))
PY_NAME = re.compile(r"(?<![\w./-])([\w][\w/.-]*\.py)\b(?!::)")
TEST_ID = re.compile(r"(?<![\w/-])((?:tests/)?test_\w+\.py)::(\w+)")
MODULE_CMD = re.compile(r"-m\s+((?:sppo|ray_jobs|bench)(?:\.\w+)*)")
FLAG = re.compile(r"(?<![\w-])(--[a-zA-Z][\w-]*)")
MAKE = re.compile(r"(?:^|[\s;&|(`])make((?:\s+\S+)+)")
SECTIONS = tuple(RunConfig.model_fields)
DOTTED = re.compile(r"(?<![\w./$-])((?:%s)(?:\.(?:[A-Za-z_]\w*|\*))+)" % "|".join(SECTIONS))
URL = re.compile(r"https?://\S+")


# ------------------------------------------------------------------ what the code defines


@cache
def repo_files() -> tuple[str, ...]:
    skip = {".git", ".venv", "__pycache__", ".pytest_cache", "outputs", ".run", "mlruns", "build"}
    found = []
    for path in REPO.rglob("*"):
        rel = path.relative_to(REPO)
        if not any(part in skip or part.endswith(".egg-info") for part in rel.parts):
            found.append(rel.as_posix())
    return tuple(found)


@cache
def defined_names(file: str) -> frozenset[str]:
    tree = ast.parse((REPO / "tests" / file).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
    return frozenset(names)


@cache
def module_flags(module: str) -> frozenset[str] | None:
    """The argparse flags a `python -m module` accepts, read from its source (and its package's
    common.py, which bench's modules share); None for a module that is not in the repository."""
    base = REPO / module.replace(".", "/")
    main = base / "__main__.py" if base.is_dir() else base.with_suffix(".py")
    if not main.exists():
        return None
    sources = [main, main.parent / "common.py"]
    flags = {"--help"}
    for source in sources:
        if source.exists():
            flags |= set(re.findall(r"""["'](--[a-zA-Z][\w-]*)["']""", source.read_text()))
    return frozenset(flags)


@cache
def all_project_flags() -> frozenset[str]:
    modules = ["sppo.run", "sppo.export", "sppo.report", "sppo.config_reference", "sppo.training_recipe",
               "sppo.devtools.localstack", "ray_jobs.submit", "bench", "bench.scale", "bench.checkpoint"]
    return frozenset(itertools.chain.from_iterable(module_flags(m) for m in modules))


@cache
def make_targets() -> frozenset[str]:
    text = (REPO / "Makefile").read_text()
    return frozenset(re.findall(r"^([A-Za-z][\w.-]*)\s*:(?!=)", text, re.M))


def config_field_exists(dotted: str) -> bool:
    """Whether `dotted` (a `*` for any field) names a field or section of RunConfig's schema."""
    model: typing.Any = RunConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if part == "*":
            return i == len(parts) - 1
        if model is None:
            return False
        if model == "mapping":  # a dict field: any key (judge.rule.weights.letters)
            return i == len(parts) - 1
        field = model.model_fields.get(part)
        if field is None:
            return False
        model = _inner(field.annotation)
    return True


def _inner(annotation) -> typing.Any:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
        if typing.get_origin(arg) is dict:
            return "mapping"
    return None


@cache
def bench_figures() -> dict[str, float]:
    data = json.loads((REPO / "bench" / "results" / "latest.json").read_text())
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors of a markdown file's headings."""
    text = FENCE.sub("", path.read_text())
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


# ------------------------------------------------------------------ what the docs say


def code_of(text: str) -> tuple[list[str], list[str]]:
    """(inline code spans, code blocks' logical lines: backslash continuations joined)."""
    blocks = FENCE.findall(text)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    spans = [" ".join(span.split()) for span in SPAN.findall(FENCE.sub("", text)) if "\n\n" not in span]
    return spans, lines


def _expand(path: str) -> list[str]:
    """`a/{b,c}.py` -> [a/b.py, a/c.py]."""
    match = re.search(r"\{([^{}]*,[^{}]*)\}", path)
    if not match:
        return [path]
    return [p for choice in match.group(1).split(",")
            for p in _expand(path[:match.start()] + choice + path[match.end():])]


def _path_exists(path: str, doc: Path) -> bool:
    path = path.rstrip("/.")
    for candidate in (REPO / path, doc.parent / path):
        if "*" in path:
            if glob.glob(str(candidate)):
                return True
        elif candidate.exists():
            return True
    return path in NOT_IN_THE_REPOSITORY


def _command_tail(text: str) -> str:
    return re.split(r"\s--\s|\s--$|\s#|\||;|&&", text)[0]


def drift(text: str, doc: Path) -> list[str]:
    """What `text` (a doc at `doc`) names that does not exist, one line each."""
    problems = []
    spans, lines = code_of(text)
    code = spans + lines
    plain = URL.sub("", text)

    # repository paths
    for token in set(itertools.chain.from_iterable(TOP_PATH.findall(c) for c in code)):
        if "<" in token or "..." in token:
            continue
        for path in _expand(token):
            if not _path_exists(path, doc):
                problems.append(f"path: {path} does not exist")
    files = repo_files()
    for name in set(itertools.chain.from_iterable(PY_NAME.findall(c) for c in code)):
        if "<" in name or "{" in name or "/" in name and name.split("/")[0] in TOP_DIRS:
            continue  # the top-level path check above covers it
        if not any(f == name or f.endswith("/" + name) for f in files):
            problems.append(f"path: no file {name} in the repository")
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (doc.parent / file) if file else doc
        if not path.exists():
            problems.append(f"link: {target} does not exist")
        elif anchor and path.suffix == ".md" and anchor not in heading_anchors(path):
            problems.append(f"link: {target}: no heading with anchor #{anchor} in {path.name}")

    # test ids
    for file, name in set(TEST_ID.findall(plain)):
        file = file.removeprefix("tests/")
        if not (REPO / "tests" / file).exists():
            problems.append(f"test id: tests/{file} does not exist ({file}::{name})")
        elif name not in defined_names(file):
            problems.append(f"test id: tests/{file} defines no {name}")

    # CLI flags
    for snippet in code:
        for match in MODULE_CMD.finditer(snippet):
            module = match.group(1)
            known = module_flags(module)
            if known is None:
                problems.append(f"flag: no module {module} in the repository")
                continue
            for flag in FLAG.findall(_command_tail(snippet[match.end():])):
                if flag not in known:
                    problems.append(f"flag: python -m {module} has no {flag}")
    for span in spans:
        bare = FLAG.match(span.strip())
        if bare and span.strip().startswith("--"):
            flag = bare.group(1)
            if flag not in all_project_flags() and flag not in EXTERNAL_FLAGS:
                problems.append(f"flag: no CLI of this project (nor EXTERNAL_FLAGS) has {flag}")

    # config fields
    for name in set(DOTTED.findall(plain)):
        if name.endswith(FILE_SUFFIXES) or name in NOT_CONFIG_FIELDS:
            continue
        if not config_field_exists(name):
            problems.append(f"config field: {name} is not a field of sppo.config.RunConfig")

    # make targets
    for snippet in itertools.chain.from_iterable(re.split(r"&&|\|\||;|\|", c) for c in code):
        for match in MAKE.finditer(snippet):
            words = [w for w in match.group(1).split() if not w.startswith("-") and "=" not in w]
            target = words[0] if words else None
            if target and re.fullmatch(r"[a-z][\w-]*", target) and target not in make_targets():
                problems.append(f"make target: the Makefile has no target {target}")

    # bench figures
    figures = bench_figures()
    for key, quoted in re.findall(r"`(\w+)`\s*(?:=\s*(?:[\d.,]+\s*/\s*[\d.,]+\s*=\s*)?)?\**(-?\d[\d,]*\.?\d*)", plain):
        if key not in figures:
            continue
        decimals = len(quoted.partition(".")[2])
        value = round(figures[key], decimals)
        if abs(float(quoted.replace(",", "")) - value) > 10 ** -decimals / 2:
            problems.append(f"bench figure: `{key}` is quoted as {quoted}; bench/results/latest.json holds "
                            f"{figures[key]:.{max(decimals, 2)}f}")
    return sorted(set(problems))


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_the_docs_name_only_what_exists(doc):
    assert drift(doc.read_text(), doc) == []


PLANTED = """
The planted doc. `sppo/no_such_module.py` and [a guide](docs/no-such-guide.md) and
[a section](operations.md#no-such-section) and `judging/no_such_judge.py`.
The outage test is `tests/test_cluster_faults.py::test_an_mlflow_outage_is_waited_out` and
`test_nothing.py::test_x`.

```bash
python -m sppo.run --config configs/tiny.yaml --no-such-flag 1 -- ignored --also-ignored
make demo RAY_PORT=1 && make clean
```

`--resume-frm 3`, `sampling.engine_fallbak: false`, `train.lora.rnk`, `timeouts.placement_seconds`,
and `iteration_ratio` 9.99; `scale_ratio` = 1.0 / 1.0 = **7.77**.
"""


def test_each_kind_of_drift_is_caught():
    found = "\n".join(drift(PLANTED, REPO / "docs" / "planted.md"))
    for expected in [
        "path: sppo/no_such_module.py does not exist",
        "link: docs/no-such-guide.md does not exist",  # relative to docs/: docs/docs/...
        "link: operations.md#no-such-section: no heading with anchor #no-such-section",
        "path: no file judging/no_such_judge.py",
        "test id: tests/test_cluster_faults.py defines no test_an_mlflow_outage_is_waited_out",
        "test id: tests/test_nothing.py does not exist",
        "flag: python -m sppo.run has no --no-such-flag",
        "make target: the Makefile has no target clean",
        "flag: no CLI of this project (nor EXTERNAL_FLAGS) has --resume-frm",
        "config field: sampling.engine_fallbak is not a field",
        "config field: train.lora.rnk is not a field",
        "config field: timeouts.placement_seconds is not a field",
        "bench figure: `iteration_ratio` is quoted as 9.99",
        "bench figure: `scale_ratio` is quoted as 7.77",
    ]:
        assert expected in found, f"{expected!r} not reported in:\n{found}"
    for fine in ("--also-ignored", "target demo", "configs/tiny.yaml"):  # after `--`, a real target, a real file
        assert fine not in found


def test_what_exists_is_not_reported():
    text = """`sppo/config.py`, `judging/rules.py`, `configs/tiny-{dpo,ipo}.yaml`, [ops](operations.md#5-resume),
`tests/test_config.py::test_bad_values_name_the_field`, `test_prompts.py`, `python -m sppo.run --plan --node x`,
`--strict`, `make test PYTEST_ARGS=-x`, `train.lora.rank`, `eval.judge.*`, `judge.rule.weights.letters`,
`sampling.py`, `iteration_ratio` %.2f.""" % json.loads((REPO / "bench/results/latest.json").read_text())[
        "iteration_ratio"]
    assert drift(text, REPO / "docs" / "planted.md") == []


def test_the_config_reference_is_generated_from_the_schema():
    from sppo.config_reference import REFERENCE, render

    assert REFERENCE.read_text() == render(), "docs/config-reference.md is stale: run python -m sppo.config_reference"


def test_the_config_reference_covers_every_field_and_is_linked():
    text = (REPO / "docs" / "config-reference.md").read_text()

    def fields(model, prefix=""):
        for name, field in model.model_fields.items():
            inner = _inner(field.annotation)
            if isinstance(inner, type):
                yield from fields(inner, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    missing = [name for name in fields(RunConfig) if f"| `{name}` |" not in text]
    assert missing == []
    for doc in ("README.md", "docs/configs.md"):
        assert "config-reference.md" in (REPO / doc).read_text(), f"{doc} does not link the config reference"


def test_the_readme_lists_every_flag_of_sppo_run():
    from sppo.run import build_parser

    flags = {s for a in build_parser()._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
    readme = (REPO / "README.md").read_text()
    sentence = re.search(r"`python -m sppo\.run --help` documents every flag:(.+?)\.\s+[A-Z]", readme, re.S)
    assert sentence, "README no longer says which flags `python -m sppo.run --help` documents"
    assert flags == set(FLAG.findall(sentence.group(1)))


def test_the_bad_input_table_is_the_test_cases():
    """docs/reliability.md's bad-input table: one row per case of tests/test_bad_input.py, with
    the text its error line must contain (no Python reprs)."""
    tree = ast.parse((REPO / "tests" / "test_bad_input.py").read_text())
    cases = next(node.value for node in tree.body
                 if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CASES")
    expected = {ast.literal_eval(k): ast.literal_eval(v.elts[1]) for k, v in zip(cases.keys, cases.values)}
    doc = (REPO / "docs" / "reliability.md").read_text()
    table = doc[doc.index("| bad input | the error line contains |"):].split("\n\n")[0].splitlines()[2:]
    rows = {}
    for row in table:
        name, contains = (cell.strip() for cell in row.strip("|").split("|", 1))
        rows[name] = contains.strip("`")
    assert rows == expected


# ------------------------------------------------------------------ the guides' recipes


GUIDES = REPO / "docs" / "guides.md"


def _blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.M | re.S)


def test_the_prompt_guide_example_is_what_the_code_reads(tmp_path):
    from sppo.config import load_config
    from sppo.prompts import PromptSourceError, load_prompts

    [jsonl] = _blocks(GUIDES, "jsonl")
    [config] = _blocks(GUIDES, "yaml")
    prompts = tmp_path / "my_prompts.jsonl"
    prompts.write_text(jsonl)
    (tmp_path / "my.yaml").write_text(config)
    cfg = load_config(tmp_path / "my.yaml", {"prompts.source": str(prompts)})
    assert load_prompts(cfg.prompts) == [json.loads(line)["prompt"] for line in jsonl.splitlines()]
    # The guide: a cell that is not a string (chat messages) is refused, naming the row.
    prompts.write_text(json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(PromptSourceError, match="row 0 of column 'prompt'.*holds a list, not a string"):
        load_prompts(cfg.prompts)


def test_the_storage_guide_copies_a_run_down_for_report_and_export(tmp_path):
    """The guide's `python -c` line, on a run in a shared directory (a storage_uri that is a
    path; an s3:// one goes through the same pyarrow calls, tests/test_shared_storage.py), then
    what report and export read from the copy."""
    from sppo.export import export_iteration
    from sppo.report import iteration_metrics

    storage, copy = tmp_path / "storage" / "run1", tmp_path / "run1"
    (storage / "iter-1" / "checkpoint").mkdir(parents=True)
    (storage / "manifest.json").write_text(json.dumps(
        {"lineage": None, "iterations": {"1": {"stages": {"tracking": {"status": "done"}}}}}))
    (storage / "iter-1" / "stage_metrics.json").write_text(json.dumps({"eval/win_rate_vs_base": 0.6}))
    (storage / "iter-1" / "train_history.json").write_text("[]")
    (storage / "iter-1" / "checkpoint" / "config.json").write_text("{}")
    (storage / "iter-1" / "checkpoint" / "README.md").write_text("---\nlicense: apache-2.0\n---\ncard\n")

    [line] = [line for line in _blocks(GUIDES, "bash")[-1].splitlines() if "sync_down" in line]
    code = re.search(r'python -c "(.+)"', line).group(1)
    assert "'s3://bucket/sppo/run1'" in code and "Path('run1')" in code
    exec(code.replace("'s3://bucket/sppo/run1'", repr(str(storage))).replace("Path('run1')", f"Path({str(copy)!r})"),
         {})
    assert iteration_metrics(copy) == {1: {"eval/win_rate_vs_base": 0.6}}
    target = export_iteration(copy, 1, tmp_path / "exported")
    assert (target / "config.json").exists() and (target / "README.md").read_text().endswith("card\n")
