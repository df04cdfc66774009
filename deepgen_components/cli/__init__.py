"""The ``deepgen`` command line: the application layer, on top of everything and imported by nothing below it.

Every subcommand lives in its own module here and is registered explicitly in :func:`build_parser`:
``generate`` / ``edit`` / ``info`` / ``demo`` (:mod:`.generate`), ``export`` (:mod:`.export`), ``data convert``
(:mod:`.data`), ``train`` (:mod:`.train`), ``convert`` (:mod:`.convert`), ``bench`` (:mod:`.bench`), ``eval``
(:mod:`.evaluate`) and ``shapes`` (:mod:`.shapes`). The flags they share are public in :mod:`.args`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from deepgen_components.cli import args, bench, convert, data, evaluate, export, generate, shapes, train
from deepgen_components.cli.args import *  # noqa: F403 - the shared flags, public here too
from deepgen_components.cli.args import USER_ERRORS, ArgumentParser
from deepgen_components.cli.generate import DEMO_INSTRUCTION, DEMO_PROMPTS

__all__ = [*args.__all__, "DEMO_INSTRUCTION", "DEMO_PROMPTS", "build_parser", "main"]

# The subcommand modules, in the order `deepgen --help` lists them.
COMMANDS = (generate, export, data, train, convert, shapes, bench, evaluate)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="deepgen", description="DeepGen 1.0 components: generate, edit, inspect.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also DEEPGEN_DEBUG=1); by default a bad input is "
                             "one line")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS:
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        # `deepgen train` takes key=value overrides anywhere among its options (argparse hands a positional
        # nargs='*' only the first run of them).
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extras):
            args.overrides = [*args.overrides, *extras]
        else:
            prog = f"{parser.prog} {args.command}"
            parser.exit(2, f"{prog}: error: unrecognized arguments: {' '.join(extras)} (see `{prog} --help`)\n")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.debug or os.environ.get("DEEPGEN_DEBUG", "") not in ("", "0"):
        return args.func(args)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        if not _is_user_error(err):
            raise
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
        print(f"deepgen {args.command}: error: {message}", file=sys.stderr)
        return 1 if isinstance(err, FloatingPointError) else 2


def _is_user_error(err: BaseException) -> bool:
    """OSError always (files, folders, disks); ValueError / TypeError / FloatingPointError when raised by our own
    code (a validation message), not from inside a library (a bug, which keeps its traceback)."""
    if isinstance(err, OSError):
        return True
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals
    return module.get("__name__", "").startswith("deepgen_components") or module.get("__file__") == __file__

