"""The README documents what the code does."""

import pathlib
import re

from training import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_config_reference_is_the_schema():
  table = README.split("<!-- config-table:start -->\n", 1)[1].split(
      "\n<!-- config-table:end -->", 1)[0]
  assert table == config_lib.describe(), (
      "README's configuration table is stale: regenerate it with "
      "`python -m training.config`")


def test_readme_configs_exist():
  for path in set(re.findall(r"`(configs/[\w/]+\.py)`", README)):
    assert (ROOT / path).is_file(), path


def test_stage_lists_match_the_schema():
  for method, stages in config_lib.STAGES.items():
    assert f"`{method}`: `{' → '.join(stages)}`" in README, method
