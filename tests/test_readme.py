"""Every ```python block of README.md runs as written."""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

# Each block in a fresh namespace, in one interpreter (imports cost seconds).
RUNNER = """
import sys, warnings
warnings.simplefilter("ignore")
for i, code in enumerate(sys.argv[1:]):
  exec(compile(code, f"README.md python block {i + 1}", "exec"), {})
"""


def python_blocks(text: str) -> list[str]:
  """The contents of the ```python fences of a markdown text."""
  return BLOCK.findall(text)


def test_block_extraction_finds_fences():
  text = "a\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n"
  assert python_blocks(text) == ["x = 1\n", "y = 2\n"]


def test_readme_python_blocks_run(tmp_path):
  blocks = python_blocks((ROOT / "README.md").read_text())
  assert blocks, "README.md has no python blocks"
  proc = subprocess.run([sys.executable, "-c", RUNNER, *blocks], cwd=ROOT,
                        capture_output=True, text=True, timeout=900,
                        env={**os.environ, "TMPDIR": str(tmp_path)})
  assert proc.returncode == 0, proc.stderr[-3000:]
