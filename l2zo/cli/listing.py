"""``l2zo tasks``, ``l2zo optimizers``, ``l2zo models``: one line each, with a short description."""

from __future__ import annotations

from jsonargparse import Namespace

from l2zo.cli.parser import CommandParser, command_parser


def _print_table(rows: dict[str, str]) -> None:
    width = max(map(len, rows))
    for name, desc in rows.items():
        print(f"{name:<{width}}  {desc}")


def _tasks(args: Namespace) -> int:
    from l2zo.tasks.base import task_names

    _print_table({**task_names(), "<file>.yaml": "a user-defined classification task (see l2zo/tasks/custom.py)"})
    return 0


def _optimizers(args: Namespace) -> int:
    from l2zo.optim.registry import optimizer_specs

    _print_table({name: spec.description for name, spec in optimizer_specs().items()})
    return 0


def _models(args: Namespace) -> int:
    from l2zo.models import model_aliases

    _print_table({**model_aliases(), "<hub id|folder|.gguf>": "any Hugging Face causal LM"})
    return 0


def register(cli: CommandParser) -> None:
    for name, fn, text in (
        ("tasks", _tasks, "list the tasks"),
        ("optimizers", _optimizers, "list the optimizers"),
        ("models", _models, "list the model aliases"),
    ):
        cli.add_command(name, command_parser(description=text), fn, help=text)
