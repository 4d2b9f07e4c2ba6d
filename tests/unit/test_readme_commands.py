"""README.md's command list names every registered CLI command, and nothing that is not one."""

from __future__ import annotations

import re
from pathlib import Path

from shoal.cli import COMMANDS

README = Path(__file__).resolve().parents[2] / "README.md"


def _documented() -> set[str]:
    section = README.read_text().split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    assert blocks, "README.md's Commands section has a command block"
    return {name for b in blocks for name in re.findall(r"(?:^|[;\s])shoal ([a-z][a-z-]*)", b, re.M)}


def test_every_command_is_in_the_readme() -> None:
    missing = sorted(set(COMMANDS) - _documented())
    assert not missing, f"registered commands missing from README.md's Commands section: {missing}"


def test_the_readme_names_no_unknown_command() -> None:
    unknown = sorted(_documented() - set(COMMANDS))
    assert not unknown, f"README.md's Commands section names commands that do not exist: {unknown}"
