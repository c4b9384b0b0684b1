"""The base of the console's management commands (DESIGN.md, "Command line").

DESIGN's contract: a user error prints ONE line on stderr and exits non-zero, no traceback.
argparse prints its whole usage block before the error line when a flag is missing or a value
is not one of its choices; `ContractCommand` keeps only the error line (`manage.py CMD:
error: ...`, exit 2), for the command and every subcommand. `--help` still shows the usage.
"""

from __future__ import annotations

import argparse
import gc

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

    def run_from_argv(self, argv):
        """The command line's entry (manage.py), never `call_command`.

        The interpreter's last garbage collections walk every object Django and the project
        loaded, which cost 0.3-0.9 s on a busy machine after the command's work was done (a
        script waiting for `backup --wait` saw it). The process is ending: its objects are
        frozen out of those collections; files and connections still close as usual.
        """
        try:
            return super().run_from_argv(argv)
        finally:
            gc.freeze()
