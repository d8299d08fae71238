"""The package imports and CI runs the README's test command."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_top_level_packages_import():
  import convert  # noqa: F401
  import ddrop_jax  # noqa: F401
  import dsp_jax  # noqa: F401
  import models  # noqa: F401


def test_readme_has_two_quickstart_commands():
  text = (ROOT / "README.md").read_text()
  section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  commands = re.findall(r"```bash\n(.*?)\n```", section, re.S)
  assert len(commands) == 2, commands
  assert "run.py --config" in commands[0]
  assert "[test]" in commands[1] and "pytest" in commands[1]
