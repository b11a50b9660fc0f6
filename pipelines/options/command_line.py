"""A pipeline's command line, from the option groups it takes: parsed and checked whole, or `--help`.

A command line is checked whole before anything runs (CONTRACT.md: exit 2, one line on stderr): an
argument that is neither one of the pipeline's own options nor a known Beam or Dataflow option is
refused, naming it (and the option it most resembles); so is a stray value, such as the second file
of an unquoted pattern that the shell expanded; so is a value of the wrong type. Then the groups
check their values, and rules.py the rules across groups.
"""

from __future__ import annotations

import argparse
import difflib
import inspect
import re
from collections.abc import Sequence
from typing import Any, NoReturn, cast

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.options.base import EtlOptions, Group, HelpRequested, Option, OptionError, repeated
from pipelines.options.groups import CommandLine
from pipelines.options.rules import check_rules

PASS_THROUGH = (
    "All Apache Beam and Dataflow options pass through, e.g. --runner, --project, --region,\n"
    "--temp_location, --setup_file, --direct_num_workers, --direct_running_mode, --sdk_container_image;\n"
    "any other argument is refused (exit 2).\n\n"
    "Exit status: 0 every item succeeded; 3 the run finished but some items failed (one line on stderr,\n"
    "the items in the dead letters); 2 bad options, nothing done; 1 the run failed (one line on\n"
    "stderr, details in the log file it names). The last line on stdout is the run's JSON summary\n"
    '(also after exit 1, with an "error"); a progress line goes to stderr every 10 seconds.'
)


def parse(name: str, doc: str, groups: Sequence[type[Group]], argv: Sequence[str]) -> PipelineOptions:
    """The options of pipeline `name`, which takes `groups`, checked and in their normal forms.

    HelpRequested for `--help`; OptionError for an unknown option, a stray value, a value of the wrong
    type, a missing required option, or a value that its group or a rule refuses."""
    argv = list(argv)
    own = [option for group in groups for option in group.options]
    if {"-h", "--help"} & set(argv):
        raise HelpRequested(help_text(name, doc, groups))
    parser = _Refusing(allow_abbrev=False, add_help=False)
    for options_class in PipelineOptions.__subclasses__():
        if options_class.__module__.startswith("apache_beam."):
            options_class._add_argparse_args(cast(Any, parser))  # Beam types it as its own parser
    for option in own + list(CommandLine.options):
        option.add_to(parser)
    _, unknown = parser.parse_known_args(argv)
    ours = [f"--{option.name}" for option in own + list(CommandLine.options)] + ["--help"]
    others = [f"--{other}" for other in Group.EVERY if f"--{other}" not in ours]
    _refuse(unknown, ours, [flag for action in parser._actions for flag in action.option_strings], others)
    options = PipelineOptions(argv)
    values = options.view_as(EtlOptions)
    for group in groups:
        for option in group.options:
            _read(option, values)
        group.check(values)
    check_rules(values, [option.name for option in own])
    return options


def _read(option: Option, values: EtlOptions) -> None:
    """What every option shares: repeated values split (given, they name something: an empty
    `--target=` must not widen a run to the whole store), a required option given."""
    if option.repeatable:
        given = getattr(values, option.name)
        parts = repeated(given)
        if given and not parts:
            raise OptionError(option.name, "given with no value")
        setattr(values, option.name, parts)
    if option.required and not getattr(values, option.name):
        raise OptionError(option.name, f"required: {option.required}")


class _Refusing(argparse.ArgumentParser):
    """A parser whose errors are OptionErrors (one line), not a usage block and SystemExit."""

    def error(self, message: str) -> NoReturn:
        match = re.fullmatch(r"argument (-[^\s:/]+)(?:/\S+)?: (.*)", message, flags=re.DOTALL)
        if not match:
            raise OptionError(None, message)
        reason = re.sub(r"^invalid int value: (.*)$", r"\1 is not a whole number", match[2])
        raise OptionError(match[1].lstrip("-"), reason)


def _refuse(unknown: list[str], ours: list[str], known: list[str], others: list[str]) -> None:
    """An OptionError naming the unknown options, else the stray values, if there are any.
    `others` are options of other pipelines."""
    options, strays = [], []
    index = 0
    while index < len(unknown):
        argument = unknown[index]
        if argument.startswith("-") and argument != "-":
            options.append(argument.split("=", 1)[0])
            if "=" not in argument and index + 1 < len(unknown) and not unknown[index + 1].startswith("-"):
                index += 1  # the unknown option's value
        else:
            strays.append(argument)
        index += 1
    if options:
        first = options[0]
        if first in others:
            raise OptionError(None, f"{first}: not an option of this pipeline (see --help)")
        guess = difflib.get_close_matches(first, ours, n=1) or difflib.get_close_matches(first, known, n=1)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        more = f"; also unknown: {', '.join(options[1:])}" if options[1:] else ""
        raise OptionError(None, f"{first}: unknown option{hint}{more}")
    if strays:
        shown = ", ".join(repr(stray) for stray in strays[:3]) + (
            f" and {len(strays) - 3} more" if strays[3:] else ""
        )
        raise OptionError(
            None,
            f"unexpected argument{'s' if strays[1:] else ''} {shown}: every value belongs to an option "
            "(--option=value); quote a value with wildcards, e.g. --input='dir/*.dcm', so that the shell "
            "does not expand it",
        )


def help_text(name: str, doc: str, groups: Sequence[type[Group]]) -> str:
    """The pipeline's docstring, then its options by group with their help texts."""
    parser = argparse.ArgumentParser(
        prog=f"dicom-etl {name}",
        usage=f"dicom-etl {name} --option=value ...   (or: python -m pipelines.{name} --option=value ...)",
        description=inspect.cleandoc(doc),
        epilog=PASS_THROUGH,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(
            prog, max_help_position=40, width=100
        ),
        add_help=False,
    )
    for group in groups:
        section = parser.add_argument_group(group.title)
        for option in group.options:
            option.add_to(section, help=option.help + (" Required." if option.required else ""))
    command_line = parser.add_argument_group(CommandLine.title)
    for option in CommandLine.options:
        option.add_to(command_line)
    command_line.add_argument("-h", "--help", action="store_true", help="Show this help and exit.")
    return parser.format_help()
