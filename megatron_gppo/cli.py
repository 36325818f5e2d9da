"""`megatron-gppo` command line.

Each subcommand lives in its own module that exposes `add_arguments(parser)`
and `run(args) -> int`; this file only wires them up and turns user errors
(`ValueError`, `FileNotFoundError`) into one line on stderr and exit code 2.
Command modules keep their top-level imports light (torch, megatron and
transformers are imported inside `run`), so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help)
SUBCOMMANDS = {
    "train": ("megatron_gppo.commands.launch", "train a policy with CE-GPPO (or another registered loss) from a YAML config"),
    "sft": ("megatron_gppo.commands.launch", "supervised warm-up through the Megatron policy, exported as a Hugging Face model"),
    "serve": ("megatron_gppo.commands.serve", "run the SGLang-protocol rollout server on CPU (transformers backend)"),
    "config": ("megatron_gppo.commands.config", "print the resolved config, or the reference of every key"),
}

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse already exits with 2 on usage errors; keep its message to one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="megatron-gppo",
        description="CE-GPPO reinforcement learning on a Megatron-Core policy with SGLang rollouts.",
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of user errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        sub_parser.set_defaults(_module=module_name)
        importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return importlib.import_module(args._module).run(args) or 0
    except (ValueError, FileNotFoundError, NotADirectoryError) as err:
        if args.traceback:
            raise
        print(f"megatron-gppo {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"megatron-gppo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
