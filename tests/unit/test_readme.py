"""The README's documented commands and config reference stay true."""

import re
from pathlib import Path

from megatron_gppo.commands.config import format_reference
from megatron_gppo.config import describe_fields

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def test_config_reference_matches_the_code():
    block = re.search(r"<!-- config-reference:start -->\n(.*?)\n<!-- config-reference:end -->", README, re.S)
    assert block, "README lost its config-reference markers"
    expected = format_reference(describe_fields())
    assert block.group(1).strip() == expected.strip(), (
        "README config reference is stale: regenerate with `megatron-gppo config --reference`"
    )


def test_ci_runs_the_readme_test_command():
    quick_start = re.search(r"## Quick start\n\n```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert len(quick_start) == 2, "the quick start is exactly two commands"
    test_command = quick_start[1].split("#")[0].strip()
    ci_script = (ROOT / ".ci" / "run").read_text()
    assert test_command in ci_script.splitlines()
