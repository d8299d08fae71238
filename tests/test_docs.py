"""The README and docs/ document what the code does, and what they show runs.

* README.md stays short; every relative link of README.md and docs/*.md
  resolves (files, and anchors of Markdown files);
* every ```python block of README.md and docs/*.md runs as written;
* every ``python ...`` command line of README.md's bash blocks runs with
  ``--help``;
* the configuration reference in docs/cli.md is the schema's, and the stage
  lists are the schema's.
"""

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from training import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
CLI_DOC = ROOT / "docs" / "cli.md"
MAX_README_LINES = 250

PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
# [text](target) and ![alt](target); the target ends at whitespace or ")".
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")

# Each block in a fresh namespace, in one interpreter (imports cost seconds).
RUNNER = """
import sys, warnings
warnings.simplefilter("ignore")
for i in range(1, len(sys.argv), 2):
  exec(compile(sys.argv[i + 1], sys.argv[i], "exec"), {})
"""


def python_blocks(text: str) -> list[str]:
  """The contents of the ```python fences of a markdown text."""
  return PYTHON_BLOCK.findall(text)


def slug(heading: str) -> str:
  """GitHub's anchor of a Markdown heading."""
  text = heading.strip().lower().replace("`", "")
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
  """The anchors of a Markdown file's headings (outside code fences)."""
  out, fenced = set(), False
  for line in path.read_text().splitlines():
    if line.startswith("```"):
      fenced = not fenced
    elif not fenced and line.startswith("#"):
      out.add(slug(line.lstrip("#")))
  return out


def relative_links(path: pathlib.Path) -> list[str]:
  """The relative link targets of a Markdown file (outside code fences)."""
  text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.S | re.M)
  return [t for t in LINK.findall(text)
          if not re.match(r"[a-z]+:", t)]  # http:, https:, mailto:


def readme_commands(text: str) -> list[list[str]]:
  """The programs of README's ``python ...`` lines in bash blocks, as
  ``python -m MODULE [SUBCOMMAND]`` or ``python SCRIPT`` argument lists."""
  out = []
  for block in BASH_BLOCK.findall(text):
    for line in block.replace("\\\n", " ").splitlines():
      if not line.startswith("python "):
        continue
      words = shlex.split(line.split("#", 1)[0])
      program = words[1:3] if words[1] == "-m" else words[1:2]
      rest = words[len(program) + 1:]
      # A subcommand (python -m convert export ...) has its own --help.
      if rest and re.fullmatch(r"[a-z]+", rest[0]):
        program.append(rest[0])
      if program not in out:
        out.append(program)
  return out


def test_extraction_helpers():
  text = ("a\n```python\nx = 1\n```\n```bash\npython run.py --config c.py \\\n"
          "  --x 1\npython -m convert export d --out e  # note\nls\n```\n"
          "```python\ny = 2\n```\n[a](b.md#c) ![i](img/x.png) [w](https://x)\n")
  assert python_blocks(text) == ["x = 1\n", "y = 2\n"]
  assert readme_commands(text) == [["run.py"], ["-m", "convert", "export"]]
  assert LINK.findall(text) == ["b.md#c", "img/x.png", "https://x"]
  assert slug("DSP on a bottleneck ResNet (digits, G = 4)") == (
      "dsp-on-a-bottleneck-resnet-digits-g--4")
  assert slug("Stage `group`: group learning") == "stage-group-group-learning"


def test_readme_is_short():
  n = len(README.read_text().splitlines())
  assert n <= MAX_README_LINES, (
      f"README.md has {n} lines (at most {MAX_README_LINES}): move detail "
      "into docs/")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
  for target in relative_links(page):
    file, _, anchor = target.partition("#")
    dest = (page.parent / file).resolve() if file else page
    assert dest.exists(), f"{page.name}: broken link {target}"
    if anchor and dest.suffix == ".md":
      assert anchor in anchors(dest), f"{page.name}: no anchor {target}"


def test_python_blocks_run(tmp_path):
  args = []
  for page in PAGES:
    for i, code in enumerate(python_blocks(page.read_text())):
      args += [f"{page.relative_to(ROOT)} python block {i + 1}", code]
  assert args, "no python blocks found"
  proc = subprocess.run([sys.executable, "-c", RUNNER, *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=900,
                        env={**os.environ, "TMPDIR": str(tmp_path)})
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_readme_commands_have_help():
  commands = readme_commands(README.read_text())
  assert ["run.py"] in commands
  for program in commands:
    proc = subprocess.run([sys.executable, *program, "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (program, proc.stderr[-2000:])
    assert "usage" in proc.stdout.lower(), program


def test_config_reference_is_the_schema():
  table = CLI_DOC.read_text().split("<!-- config-table:start -->\n", 1)[1]
  table = table.split("\n<!-- config-table:end -->", 1)[0]
  assert table == config_lib.describe(), (
      "docs/cli.md's configuration table is stale: regenerate it with "
      "`python -m training.config`")


def test_documented_configs_exist():
  for page in PAGES:
    for path in set(re.findall(r"`(configs/[\w/]+\.py)", page.read_text())):
      assert (ROOT / path).is_file(), f"{page.name}: {path}"


def test_stage_lists_match_the_schema():
  text = CLI_DOC.read_text()
  for method, stages in config_lib.STAGES.items():
    assert f"`{method}`: `{' → '.join(stages)}`" in text, method


def test_the_ci_runs_readme_test_command():
  # .ci/run evaluates the first such line of README.md.
  lines = [line for line in README.read_text().splitlines()
           if re.match(r"^pip install .*\[test\].*pytest", line)]
  assert lines and lines[0] == (
      'pip install torch==2.13.0 -e ".[test]" && python -m pytest -q tests')


def test_pipeline_figures_come_from_the_script(tmp_path):
  proc = subprocess.run([sys.executable, "docs/make_figures.py", "--out",
                         str(tmp_path)], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  shown = re.findall(r"\(docs/img/([\w.]+\.png)\)", README.read_text())
  assert shown and all((tmp_path / name).is_file() for name in shown), shown
