"""README's Quickstart is what CI runs: two commands, the second one verbatim in .ci/run."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _quickstart_commands():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text.split("## Quickstart", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quickstart_has_exactly_two_commands():
    commands = _quickstart_commands()
    assert len(commands) == 2
    assert "skipdit demo" in commands[0] and "pytest" in commands[1]
    assert "torch==2.13.0" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read().splitlines()
    assert _quickstart_commands()[1] in ci
