"""The ``reft-rs`` command: train, run, evaluate, inspect and convert ReFT
interventions from the shell.

    reft-rs quickstart                      # the first job: SmolLM2 learns a reply style
    reft-rs train --data train.jsonl --output run/
    reft-rs sweep --data train.jsonl --eval-data dev.jsonl --output sweep/
    reft-rs compare --data train.csv --eval-data dev.csv --test-data test.csv --output compare/
    reft-rs generate --checkpoint run/ --prompt "Hello" [--engine rust]
    reft-rs eval --checkpoint run/ --data test.jsonl
    reft-rs serve --model smollm2 --adapter style=run/checkpoint   # OpenAI-compatible API
    reft-rs inspect run/
    reft-rs steer --pairs pairs.jsonl --layers 10,14 --output steer/   # steering vectors
    reft-rs convert pyreft pyreft_folder/ converted/

Every subcommand has ``--help``. Mistakes in the input (a missing file, a
malformed dataset line, an unknown layer, a bad position spec) end the
command with one line on stderr and exit status 2; other failures, those
from torch or a fault of reft_rs included, with one line and exit status 1
(``REFT_RS_TRACEBACK=1`` prints the traceback instead).

One module per subcommand (``register`` adds its parser, ``run`` runs it);
``common`` (arguments, checkpoint lookup) and ``generators`` (the torch and
Rust reply generators of ``generate`` and ``eval``) hold what they share.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from ..errors import ReftError
from . import compare, convert, evaluate, generate, inspect, quickstart, serve, steer, sweep, train
from .common import PROG, USER_ERRORS, UsageError, read_checkpoint

__all__ = ["build_parser", "main"]

COMMANDS = (quickstart, train, sweep, compare, generate, evaluate, serve, steer, inspect, convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=__doc__.split("\n\nOne module")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"reft-rs {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    read_checkpoint.cache_clear()  # one command's reads; a later call may see new files
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except UsageError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except USER_ERRORS as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except ReftError as error:
        print(f"{PROG} {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`reft-rs inspect ... | head`): stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:
        # Not raised on purpose (a fault in torch, a bug): still one line,
        # with the type; REFT_RS_TRACEBACK=1 shows the whole traceback.
        if os.environ.get("REFT_RS_TRACEBACK"):
            raise
        print(f"{PROG} {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
