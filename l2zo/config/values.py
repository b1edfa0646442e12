"""Reading values the user typed: YAML files and ``key=value`` text.

One YAML reading for every file a user hands over (``--config``, ``--opt-config``), and one scalar parser
for every ``key=value`` on the command line (``--opt-args``, ``--optimizers``, ``--sweep``): ``1e-4`` is a
float everywhere (PyYAML follows YAML 1.1, which wants ``1.0e-4``), ``3`` an int, ``true`` a bool.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from l2zo.errors import L2ZOError


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-4`` and ``5E3`` as floats the way YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text (raises ``yaml.YAMLError``)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in the YAML file ``path``; ``what`` names the file in the one-line errors."""
    path = Path(path)
    if not path.is_file():
        raise L2ZOError(f"{what} not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise L2ZOError(f"{what} {path} is not UTF-8 text (bad byte at offset {exc.start}); save it as UTF-8") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise L2ZOError(f"{what} {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise L2ZOError(f"{what} {path} must be a mapping of keys to values, not a {type(data).__name__}")
    return data


def parse_scalar(text: str) -> Any:
    """One value typed on the command line: '1e-4' -> 1e-4, '3' -> 3, 'true' -> True, '[1, 2]' -> [1, 2].

    Text that is no number, bool, null or list stays text ('x' -> 'x', 'a: b' -> 'a: b').
    """
    text = text.strip()
    try:
        value = load_yaml(text) if text else text
    except yaml.YAMLError:
        return text
    return text if isinstance(value, dict) else value


def key_name(key: str) -> str:
    """A key as the configs spell it: 'weight-decay' -> 'weight_decay'."""
    return str(key).strip().replace("-", "_")


def parse_pair(text: str, what: str) -> tuple[str, Any]:
    """'lr=1e-4' -> ('lr', 1e-4); ``what`` names the option in the error."""
    if "=" not in text:
        raise L2ZOError(f"bad {what} item {text!r}: expected key=value")
    key, value = text.split("=", 1)
    return key_name(key), parse_scalar(value)


def parse_kv(text: str, what: str) -> dict[str, Any]:
    """'a=1,b=x' -> {'a': 1, 'b': 'x'}: comma-separated ``parse_pair`` items."""
    return dict(parse_pair(item, what) for item in text.split(",") if item.strip())


def split_list(value: list[Any] | str) -> list[Any]:
    """A YAML list as it is; 'a,b' -> ['a', 'b'] (the comma form of the command line)."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return list(value)
