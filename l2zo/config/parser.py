"""The config dataclasses served by jsonargparse: flags, ``--config FILE`` and help from field docstrings.

``ConfigParser(cls)`` has one flag per field of the dataclass ``cls``; a nested dataclass field (``data``)
gives ``--data.model`` and so on. Every field also answers to its short, dashed name (``--batch-size``,
``--model``), the names of the command line before jsonargparse, and a bool field to ``--cache-z`` /
``--no-cache-z`` without a value. A YAML ``--config`` file may use either layout (``model: x`` or
``data: {model: x}``), with dashes or underscores; flags win over the file wherever they stand.

Every mistake is one ``L2ZOError`` line naming the key: an unknown key (with the valid ones), a value of
the wrong type (with the type), a bad choice (with the choices), and a file that is missing, not UTF-8,
not YAML or not a mapping.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace, set_parsing_settings

from l2zo.config.checks import choices_of, field_types, flag
from l2zo.config.values import key_name, read_yaml_mapping
from l2zo.errors import L2ZOError

set_parsing_settings(docstring_parse_attribute_docstrings=True)

C = TypeVar("C")


def _is_config(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaf_types(cls: type, skip: Iterable[str] = (), prefix: str = "") -> dict[str, Any]:
    """{dotted key: annotation} of every leaf field of the dataclass ``cls``, nested ones included."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key, tp = prefix + f.name, field_types(cls)[f.name]
        if _is_config(tp):
            out.update(leaf_types(tp, skip, key + "."))
        elif key not in skip:
            out[key] = tp
    return out


def _default(f: dataclasses.Field) -> Any:
    """The default instance of a nested config field (its factory's value; None without a factory)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def type_name(tp: Any) -> str:
    """A short name of an annotation for error messages: 'int', 'float or null', 'list of str'."""
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple, Sequence):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def explain(message: str, types_by_key: dict[str, Any], subject: str = "") -> str:
    """One line out of a jsonargparse error: the flag, the value given and the type or choices expected."""
    found = re.match(r'Parser key "([^"]+)"', message)
    key = found.group(1) if found else None
    if key not in types_by_key:
        return " ".join(message.split())
    given = re.search(r"(?:Got|Given) value: (.*)$", message.strip())
    value = given.group(1) if given else "?"
    name = flag(key) if not subject else key
    choices = choices_of(types_by_key[key])
    if choices is not None:
        return f"bad {name} {value!r}{subject}; valid choices: {', '.join(map(str, choices))}"
    return f"bad value for {name}{subject}: {value!r} is not a valid {type_name(types_by_key[key])}"


class _ConfigFile(ActionConfigFile):
    """``--config FILE``: read and checked by l2zo (one-line errors, both key layouts), applied by jsonargparse."""

    def __call__(self, parser: ArgumentParser, cfg: Namespace, values: Any, option_string: str | None = None) -> None:
        if not isinstance(parser, ConfigParser):
            raise TypeError("--config belongs to a ConfigParser")
        nested = parser.normalize(read_yaml_mapping(values, "config file"))
        # A JSON string, not a path: jsonargparse parses it like a config file and merges it in place.
        self.apply_config(parser, cfg, self.dest, json.dumps(nested, default=str))


# Other spellings users bring from Lightning: ``--accelerator cpu`` is ``--device cpu``.
ALIASES: dict[str, tuple[str, ...]] = {"device": ("--accelerator",)}


class ConfigParser(ArgumentParser):
    """A jsonargparse parser of one config dataclass (see the module docstring)."""

    def __init__(self, *args: Any, config: type | None = None, skip: Iterable[str] = (), **kwargs: Any) -> None:
        kwargs.setdefault("exit_on_error", False)
        super().__init__(*args, **kwargs)
        self.types: dict[str, Any] = {}
        self.flat: dict[str, str] = {}  # short name -> dotted key
        if config is None:  # a helper parser jsonargparse makes of this class
            return
        self.types = leaf_types(config, skip)
        for key in self.types:
            short = key.rsplit(".", 1)[-1]
            if short in self.flat:
                raise ValueError(f"{config.__name__}: {key} and {self.flat[short]} share the short name {short!r}")
            self.flat[short] = key
        self.add_argument("--config", action=_ConfigFile, help="YAML file with the same keys as the flags (flags win)")
        nested = [f for f in dataclasses.fields(config) if _is_config(field_types(config)[f.name])]
        self.add_class_arguments(config, skip=set(skip) | {f.name for f in nested})
        for f in nested:  # a group of its own, so that its fields can be skipped and its defaults set per command
            inner_skip = {k.split(".", 1)[1] for k in skip if k.startswith(f.name + ".")}
            self.add_class_arguments(field_types(config)[f.name], f.name, default=_default(f), skip=inner_skip)
        self._add_short_names()

    def _add_short_names(self) -> None:
        """``--batch-size`` for ``--data.batch_size``; ``--cache-z`` / ``--no-cache-z`` switches for bools."""
        actions = self._option_string_actions
        for group in {key.rsplit(".", 1)[0] for key in self.types if "." in key}:
            actions["--" + group].help = f"YAML file with the {group}.* keys below"
        for key, tp in self.types.items():
            action = actions["--" + key]
            short = flag(key)
            if short not in actions:
                action.option_strings.insert(0, short)
                actions[short] = action
            for alias in ALIASES.get(key.rsplit(".", 1)[-1], ()):
                if alias not in actions:
                    action.option_strings.append(alias)
                    actions[alias] = action
            if tp is bool:  # a bare switch sets True; --flag false still works
                action.nargs, action.const = "?", True
                action.container.add_argument(short.replace("--", "--no-", 1), dest=key, action="store_const",
                                              const=False, default=argparse.SUPPRESS, help=f"set {short} false")  # fmt: skip

    def normalize(self, data: dict[str, Any], what: str = "config") -> dict[str, Any]:
        """Flat or nested keys, dashed or not, as the nested mapping jsonargparse reads; unknown keys fail."""
        found: dict[str, Any] = {}

        def visit(mapping: dict[str, Any], prefix: str) -> None:
            for raw, value in mapping.items():
                key = prefix + key_name(raw)
                if any(k.startswith(key + ".") for k in self.types):
                    if not isinstance(value, dict):
                        raise L2ZOError(
                            f"{what} key {key!r} must be a mapping of its keys, e.g. {key}: {{model: tiny}}"
                        )
                    visit(value, key + ".")
                    continue
                dotted = key if key in self.types else self.flat.get(key) if not prefix else None
                if dotted is None:
                    valid = ", ".join(self.flat)
                    raise L2ZOError(f"unknown {what} key {prefix + str(raw)!r}; valid keys: {valid}")
                if dotted in found:
                    raise L2ZOError(f"{what} key {dotted!r} is given twice")
                found[dotted] = value

        visit(data, "")
        nested: dict[str, Any] = {}
        for dotted, value in found.items():
            *groups, leaf = dotted.split(".")
            node = nested
            for g in groups:
                node = node.setdefault(g, {})
            node[leaf] = value
        return nested


def from_namespace(cls: type[C], ns: Namespace, default: Any = None) -> C:
    """The config dataclass ``cls`` out of a parsed namespace (its own checks run in ``__post_init__``).

    Fields the namespace lacks (a command's other arguments are ignored) keep ``default``'s or the class's value.
    """
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in ns:  # a skipped field keeps the default
            continue
        tp = field_types(cls)[f.name]
        if _is_config(tp):
            values[f.name] = from_namespace(tp, ns[f.name], _default(f))
        else:
            values[f.name] = ns[f.name]
    return dataclasses.replace(default, **values) if default is not None else cls(**values)


def config_first(args: Sequence[str]) -> list[str]:
    """The ``--config FILE`` arguments moved to the front, so that every flag wins over the file."""
    args = list(args)
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--config" and i + 1 < len(args):
            out += args[i : i + 2]
            del args[i : i + 2]
        elif args[i].startswith("--config="):
            out.append(args.pop(i))
        else:
            i += 1
    return out + args


def build_config(cls: type[C], file: str | Path | None = None, overrides: dict[str, Any] | None = None) -> C:
    """Defaults, then the YAML ``file``, then ``overrides`` (flat or nested keys): for Python callers and tests."""
    parser = config_parser(cls)
    try:
        ns = parser.parse_args(["--config", str(file)] if file is not None else [])
        ns = parser.parse_object(parser.normalize(overrides or {}, "override"), namespace=ns)
    except argparse.ArgumentError as exc:
        raise L2ZOError(explain(str(exc), parser.types)) from None
    return from_namespace(cls, ns)


def config_parser(cls: type, **kwargs: Any) -> ConfigParser:
    """The parser of the config dataclass ``cls``; fields named in ``cls.cli_skip`` are left out."""
    return ConfigParser(config=cls, skip=getattr(cls, "cli_skip", ()), **kwargs)
