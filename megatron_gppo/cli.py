"""`megatron-gppo` command line.

Each subcommand lives in its own module that exposes `add_arguments(parser)`
and `run(args) -> int`; this file only wires them up and turns user errors
(`ValueError`, `FileNotFoundError`) into one line on stderr and exit code 2,
and a run that stopped on a fault (`errors.RunAborted`) into one line and 1.
Command modules keep their top-level imports light (torch, megatron and
transformers are imported inside `run`), so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
from typing import Callable

from megatron_gppo.errors import RunAborted
from megatron_gppo.logs import route_library_warnings

# name -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("megatron_gppo.commands.launch", "train a policy with CE-GPPO (or another registered loss) from a YAML config"),
    "sft": ("megatron_gppo.commands.launch", "supervised warm-up through the Megatron policy, exported as a Hugging Face model"),
    "serve": ("megatron_gppo.commands.serve", "run the SGLang-protocol rollout server on CPU (transformers backend)"),
    "config": ("megatron_gppo.commands.config", "print the resolved config, or the reference of every key"),
}

EXIT_USER_ERROR = 2
EXIT_RUN_ABORTED = 1
# What a user can cause (a bad config value, a missing path): one line, not a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError)


class OneLineParser(argparse.ArgumentParser):
    """argparse already exits with 2 on usage errors; keep its message to one line (the CLI and every tool)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="megatron-gppo",
        description="CE-GPPO reinforcement learning on a Megatron-Core policy with SGLang rollouts.",
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of user errors")
    parser.add_argument("--verbose", action="store_true",
                        help="show other packages' warnings (train and sft write them to OUTPUT_DIR/logs/)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineParser)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def run_reporting_user_errors(job: Callable[[], int | None], *, prefix: str = "error: ",
                              traceback: bool = False) -> int:
    """`job()`'s exit code; a user error becomes `<prefix><first line of the message>` on stderr and code 2
    (a `RunAborted`: the same line and code 1).

    Also used by the scripts in tools/, so every entry point answers bad input the same way.
    """
    try:
        return job() or 0
    except (*USER_ERRORS, RunAborted) as err:
        if traceback:
            raise
        print(f"{prefix}{str(err).splitlines()[0] if str(err) else type(err).__name__}", file=sys.stderr)
        return EXIT_RUN_ABORTED if isinstance(err, RunAborted) else EXIT_USER_ERROR


def tool_main(parser: argparse.ArgumentParser, job: Callable[[argparse.Namespace], int | None],
              argv: list[str] | None = None) -> int:
    """The `main` of a script in tools/: parse `argv`, run `job(args)`; a user error is one line and code 2.

    Other packages' warnings are shown only with `--verbose`, and a closed pipe ends the script quietly.
    """
    parser.add_argument("--verbose", action="store_true", help="show other packages' warnings")
    args = parser.parse_args(argv)
    route_library_warnings(verbose=args.verbose)
    return _survive_closed_pipe(lambda: run_reporting_user_errors(lambda: job(args)))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    route_library_warnings(verbose=args.verbose)
    try:
        return _survive_closed_pipe(lambda: run_reporting_user_errors(
            lambda: importlib.import_module(args._module).run(args),
            prefix=f"megatron-gppo {args.command}: error: ", traceback=args.traceback))
    except KeyboardInterrupt:
        print(f"megatron-gppo {args.command}: interrupted", file=sys.stderr)
        return 130


def _survive_closed_pipe(job: Callable[[], int]) -> int:
    """`job()`, ending quietly when stdout's reader has gone (`megatron-gppo ... | head`), as `git` does."""
    try:
        code = job()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # Python would otherwise fail again flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
