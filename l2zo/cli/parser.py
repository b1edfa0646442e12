"""``CommandParser``: the ``l2zo`` command line, one jsonargparse subcommand per command.

Each command module's ``register(cli)`` adds its parser (a ``ConfigParser`` for the commands that run
a config dataclass) and the function that runs it. ``parse_args`` returns the chosen command's namespace
with that function as ``func``; a bad command line is one ``L2ZOError`` line, not jsonargparse's usage dump.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ArgumentParser, DefaultHelpFormatter, Namespace

from l2zo.config.parser import ConfigParser, config_first, explain
from l2zo.errors import L2ZOError

Handler = Callable[[Namespace], int]


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, with descriptions and epilogs (the examples) kept as written."""


class CommandParser(ArgumentParser):
    """The top-level parser: subcommands, each with its handler."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, exit_on_error=False, formatter_class=HelpFormatter, **kwargs)
        self._commands = self.add_subcommands(required=True, dest="command")
        self._handlers: dict[str, Handler] = {}
        self._parsers: dict[str, ArgumentParser] = {}

    def add_command(self, name: str, parser: ArgumentParser, handler: Handler, help: str) -> None:
        self._commands.add_subcommand(name, parser, help=help)
        self._handlers[name] = handler
        self._parsers[name] = parser

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None, **kwargs: Any) -> Namespace:  # type: ignore[override]
        """The chosen command's arguments with ``func`` (its handler); raises ``L2ZOError`` on a bad command line."""
        argv = list(sys.argv[1:] if args is None else args)
        argv = argv[:1] + config_first(argv[1:])  # a command's --config file first: its flags win wherever they stand
        try:
            ns = super().parse_args(argv, namespace, **kwargs)
        except argparse.ArgumentError as exc:
            raise L2ZOError(self._explain(str(exc), argv)) from None
        except UnicodeDecodeError as exc:  # a file jsonargparse reads itself (e.g. --data FILE)
            raise L2ZOError(
                f"a file on the command line is not UTF-8 text ({exc.reason} at offset {exc.start})"
            ) from None
        sub = ns[ns.command]
        sub.func = self._handlers[ns.command]
        return sub

    def _explain(self, message: str, argv: list[str]) -> str:
        command = argv[0] if argv else ""
        parser = self._parsers.get(command)
        types = parser.types if isinstance(parser, ConfigParser) else {}
        text = explain(message, types)
        return (
            f"{text}; see `l2zo {command} --help`" if parser is not None and text.startswith("unrecognized") else text
        )


def command_parser(description: str) -> ArgumentParser:
    """A plain subcommand parser (the commands without a config dataclass)."""
    return ArgumentParser(description=description, exit_on_error=False)
