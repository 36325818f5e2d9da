"""`megatron-gppo config`: print the resolved config or the key reference."""

from __future__ import annotations

import argparse
import sys

import yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (defaults when omitted)")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="dotted overrides, e.g. algorithm.beta1=0.75")
    parser.add_argument("--reference", action="store_true", help="print every key with its type, default and meaning (Markdown)")


def run(args: argparse.Namespace) -> int:
    from megatron_gppo.config import describe_fields, load_config, to_dict

    if args.reference:
        print(format_reference(describe_fields()))
        return 0
    config = load_config(args.config, args.overrides)
    yaml.safe_dump(to_dict(config), sys.stdout, sort_keys=False)
    return 0


def format_reference(rows: list[tuple[str, str, object, str]]) -> str:
    from pydantic import SecretStr

    lines = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, type_text, default, doc in rows:
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        default_text = "`[]`" if default == [] else f"`{default!r}`" if default != "" else '`""`'
        lines.append(f"| `{key}` | {type_text} | {default_text} | {doc} |")
    return "\n".join(lines)
