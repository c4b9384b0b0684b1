"""The base of the console's management commands (DESIGN.md, "Command line").

DESIGN's contract: a user error prints ONE line on stderr and exits non-zero, no traceback.
argparse prints its whole usage block before the error line when a flag is missing or a value
is not one of its choices; `ContractCommand` keeps only the error line (`manage.py CMD:
error: ...`, exit 2), for the command and every subcommand. `--help` still shows the usage.
"""

from __future__ import annotations

import argparse

from django.core.management.base import BaseCommand


def _error_line_only(parser: argparse.ArgumentParser) -> None:
    parser.print_usage = lambda file=None: None  # error() then prints only its one line
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                _error_line_only(subparser)


class ContractCommand(BaseCommand):
    """A BaseCommand whose argument errors are one line on stderr (exit 2)."""

    def create_parser(self, prog_name, subcommand, **kwargs):
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        _error_line_only(parser)
        return parser
