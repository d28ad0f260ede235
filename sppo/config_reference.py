"""`python -m sppo.config_reference`: docs/config-reference.md, every field of the run config.

Generated from the schema (`sppo.config.RunConfig`: each field's dotted name, type, constraints
and default) and from the comments written above each field in sppo/config.py (and a field's
`description`, where it has one), so the reference cannot drift from the code:
`tests/test_docs.py` regenerates it and fails when the committed file differs.

    python -m sppo.config_reference            # rewrite docs/config-reference.md
    python -m sppo.config_reference --check    # exit 1 if the committed file is stale
"""

from __future__ import annotations

import argparse
import ast
import inspect
import io
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
import yaml
from pydantic import BaseModel

from sppo.config import RunConfig

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "config-reference.md"

HEADER = """\
# Config reference

Every field of the run config: its dotted name, type, default and meaning. Generated from
`sppo/config.py` (the schema, and the comment above each field) by
`python -m sppo.config_reference`; do not edit it by hand: `tests/test_docs.py` fails when it
and the schema differ. A field is set in a config file (YAML, one mapping per section) or on the
command line with `--set dotted.name=value` (the value is parsed as YAML, e.g.
`--set train.lora={}`); `--iters` and `--output-dir` set `iterations` and `output_dir`. An
unknown field or a value out of range is refused before any work starts, naming the field.
Which values the shipped configs use, and where they come from: [configs.md](configs.md).
"""


class MissingMeaning(ValueError):
    """A config field with neither a comment above it nor a description: the reference would be silent."""


def _comments(cls: type) -> dict[str, str]:
    """Each field of `cls` (by name) -> the comment lines directly above it in the source, its
    trailing comment, and its Field description, as one sentence run."""
    lines, _ = inspect.getsourcelines(cls)
    source = "".join(lines)
    comment_at = {tok.start[0]: tok.string.lstrip("#").strip()
                  for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    code_lines = {n for n, line in enumerate(lines, start=1) if line.strip() and not line.strip().startswith("#")}
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while n >= 1 and n in comment_at and n not in code_lines:
            above.insert(0, comment_at[n])
            n -= 1
        trailing = [comment_at[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)
                    if n in comment_at and n in code_lines]
        description = cls.model_fields[node.target.id].description
        out[node.target.id] = " ".join([*above, *([description] if description else []), *trailing])
    return out


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The config section a field holds (a model, or an optional one), else None."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _type_text(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        named = [_type_text(a) for a in args if a is not type(None)]
        return " or ".join(named) + (" or null" if type(None) in args else "")
    if origin is dict:
        return f"mapping of {_type_text(args[0])} to {_type_text(args[1])}"
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = ((annotated_types.Ge, ">=", "ge"), (annotated_types.Gt, ">", "gt"), (annotated_types.Le, "<=", "le"),
           (annotated_types.Lt, "<", "lt"))


def _constraints(field) -> str:
    parts = []
    for item in field.metadata:
        for kind, sign, attr in _BOUNDS:
            if isinstance(item, kind):
                parts.append(f"{sign} {getattr(item, attr):g}")
        if isinstance(item, annotated_types.MinLen):
            parts.append(f"at least {item.min_length} item(s)")
    return ", ".join(parts)


def _default_text(field) -> str:
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"`{text.removesuffix('...').strip()}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def sections(model: type[BaseModel], prefix: str = "", intro: str = "") -> list[dict[str, Any]]:
    """`model`'s fields as a section {"name", "intro", "rows"}, then, depth first, each of its own
    sections; a row is (dotted name, type, default, meaning). Raises MissingMeaning for a field
    with neither a comment nor a description."""
    meanings = _comments(model)
    rows, nested = [], []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        section = _model_of(field.annotation)
        meaning = meanings.get(name, "")
        if section is not None:
            text = " ".join((meaning or inspect.cleandoc(section.__doc__ or "")).split())
            if field.get_default() is None:
                text += " Unset (`null`) by default" + ("." if "={}" in text else
                                                        f"; `--set {dotted}={{}}` sets it with the defaults below.")
            nested.append((dotted, section, text.strip()))
            continue
        if not meaning:
            raise MissingMeaning(f"{dotted}: no comment above it in sppo/config.py and no description")
        type_text = _type_text(field.annotation)
        if bounds := _constraints(field):
            type_text += f", {bounds}"
        rows.append((f"`{dotted}`", _cell(type_text), _cell(_default_text(field)), _cell(meaning)))
    out = [{"name": prefix.rstrip("."), "intro": intro, "rows": rows}] if rows else []
    for dotted, section, text in nested:
        out += sections(section, f"{dotted}.", text)
    return out


def render() -> str:
    """The whole of docs/config-reference.md."""
    parts = [HEADER]
    for section in sections(RunConfig):
        title = f"`{section['name']}`" if section["name"] else "Top level"
        parts.append(f"\n## {title}\n")
        if section["intro"]:
            parts.append(f"\n{section['intro']}\n")
        parts.append("\n| field | type | default | meaning |\n|---|---|---|---|\n")
        parts += [f"| {' | '.join(row)} |\n" for row in section["rows"]]
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sppo.config_reference",
                                     description="Write docs/config-reference.md from the run config's schema.")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the committed file differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not REFERENCE.exists() or REFERENCE.read_text() != text:
            print(f"{REFERENCE} is stale: run python -m sppo.config_reference", file=sys.stderr)
            return 1
        print(f"{REFERENCE} is up to date")
        return 0
    REFERENCE.write_text(text)
    print(f"wrote {REFERENCE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
