"""The package imports and CI runs the README's test command."""

import ast
import pathlib
import re
import subprocess
import sys

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


def test_training_imports_no_torch_at_start_up():
  # Only exporting loads torch (``convert``, imported on use).
  code = ("import sys, run, dsp_jax.pipeline, ddrop_jax.pipeline, "
          "training.pipeline, training.artifacts, convert; "
          "print('torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  assert out.strip() == "False"


def _imports(path: pathlib.Path) -> set[str]:
  """The project modules a file imports anywhere (function bodies too)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
    elif isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
  return names


def test_the_converter_has_no_import_cycles():
  files = {".".join(f.relative_to(ROOT).with_suffix("").parts): f
           for f in (ROOT / "convert").glob("*.py")
           if f.name != "__init__.py"}
  deps = {m: {d for d in _imports(f) if d in files and d != m}
          for m, f in files.items()}
  state: dict[str, int] = {}

  def visit(m, trail):
    state[m] = 1
    for d in sorted(deps[m]):
      assert state.get(d) != 1, " -> ".join(trail + [m, d])
      if d not in state:
        visit(d, trail + [m])
    state[m] = 2

  for m in sorted(files):
    if m not in state:
      visit(m, [])
