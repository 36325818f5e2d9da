"""Regenerate the README's configuration reference from the config dataclasses.

    python tools/update_readme_reference.py
"""

import re
from pathlib import Path

from megatron_gppo.commands.config import format_reference
from megatron_gppo.config import describe_fields

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def main() -> None:
    text = README.read_text()
    table = format_reference(describe_fields())
    updated, count = re.subn(f"{START}\n.*?\n{END}", lambda _: f"{START}\n{table}\n{END}", text, flags=re.S)
    if count != 1:
        raise SystemExit(f"{README}: expected one {START} ... {END} block, found {count}")
    README.write_text(updated)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
