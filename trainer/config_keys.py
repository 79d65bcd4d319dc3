"""Every config key with its default and meaning, read from the config dataclasses: the
meaning is the comment on the field's line in `trainer/config.py`, so the listing can never
drift from the code. `python -m trainer config` and `train --help` print it."""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize

from .config import Config


def _field_comments(cls: type) -> dict[str, str]:
    """field name -> the comment on its line in the class body."""
    comments: dict[str, str] = {}
    name, line_of_name = None, -1
    for tok in tokenize.generate_tokens(io.StringIO(inspect.getsource(cls)).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4:  # a field at the class body's indent
            name, line_of_name = tok.string, tok.start[0]
        elif tok.type == tokenize.COMMENT and name and tok.start[0] == line_of_name:
            comments[name] = tok.string.lstrip("#").strip()
    return comments


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def config_keys() -> list[tuple[str, str, str]]:
    """(dotted key, default, meaning) for every key, in definition order."""
    rows = []
    defaults = Config()
    for section in dataclasses.fields(Config):
        part = getattr(defaults, section.name)
        comments = _field_comments(type(part))
        for f in dataclasses.fields(part):
            rows.append((f"{section.name}.{f.name}", _show(getattr(part, f.name)), comments.get(f.name, "")))
    return rows


def format_config_keys() -> str:
    rows = config_keys()
    width = max(len(k) for k, _, _ in rows)
    default_width = min(max(len(d) for _, d, _ in rows), 14)
    lines = ["config keys (set in the YAML file or as key=value; default, then meaning):"]
    for key, default, meaning in rows:
        lines.append(f"  {key:<{width}}  {default:<{default_width}}  {meaning}".rstrip())
    return "\n".join(lines)
