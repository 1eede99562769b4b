"""Every config key with its default and a one-line meaning, generated from the config dataclasses.

One source of truth: the meaning of a field is the comment on its own line(s) in the dataclass
source, or else the comment block right above it (its first sentence); the default is the value
LoopConfig() holds (so sft.* and dpo.* show their paper defaults, which differ).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import re
import textwrap
import tokenize

from .config import LoopConfig


@functools.cache
def field_meanings(cls) -> dict[str, str]:
    """{field name: meaning} from the class source's comments ('' where a field has none)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, str] = {}
    own_line: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[:tok.start[1]].strip():
                own_line.add(tok.start[0])
    body = ast.parse(source).body[0].body
    out = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments and n not in own_line]
        if trailing:
            out[node.target.id] = " ".join(trailing)
            continue
        block, n = [], node.lineno - 1
        while n in own_line:
            block.insert(0, comments[n])
            n -= 1
        out[node.target.id] = _first_sentence(" ".join(block))
    return out


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=\.)\s+(?=[A-Z0-9])", text, maxsplit=1)[0]


def config_keys(obj=None, prefix: str = "") -> list[tuple[str, object, str]]:
    """[(dotted key, default, meaning)] for every leaf key of LoopConfig, in declaration order."""
    obj = LoopConfig() if obj is None else obj
    meanings = {}  # a subclass (DPOConfig) inherits its base's fields and their comments
    for cls in reversed(type(obj).__mro__):
        if dataclasses.is_dataclass(cls):
            meanings.update(field_meanings(cls))
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += config_keys(value, f"{prefix}{f.name}.")
        else:
            out.append((prefix + f.name, value, meanings.get(f.name, "")))
    return out


def _show(value) -> str:
    """The default as one would write it after key= (YAML flow syntax)."""
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def help_text() -> str:
    rows = [(f"{key}={_show(default)}", meaning) for key, default, meaning in config_keys()]
    width = min(max(len(k) for k, _ in rows), 40)
    lines = ["config keys, with the dataclass defaults (a --config preset may change some); give them as "
             "section.key=value after the options, or as the same keys in the YAML file:"]
    for key, meaning in rows:
        lines.append(f"  {key:<{width}}  {meaning}" if len(key) <= width else f"  {key}\n  {'':<{width}}  {meaning}")
    return "\n".join(lines)
