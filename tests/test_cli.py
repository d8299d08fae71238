"""First contact with the command line: help texts, one-line errors, pipes,
the installed entry point, ``convert inspect``, plots and TensorBoard."""

import ast
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(args, stdout=subprocess.PIPE, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=ROOT, stdout=stdout,
                        stderr=subprocess.PIPE, text=True, timeout=timeout)


def undocumented_options(help_text: str) -> list[str]:
  """Options of an argparse help text that have no help of their own."""
  lines = help_text.splitlines()
  missing = []
  for i, line in enumerate(lines):
    if not re.match(r"^  -", line):
      continue
    parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
    follows = i + 1 < len(lines) and re.match(r"^ {8,}\S", lines[i + 1])
    if len(parts) == 1 and not follows:
      missing.append(parts[0])
  return missing


def test_undocumented_options_finds_bare_options():
  text = ("options:\n  -h, --help  show this\n  --out OUT\n  --image-size SIZE\n"
          "                        input size\n  --tune      time them\n")
  assert undocumented_options(text) == ["--out OUT"]


def test_run_help_lists_every_shipped_config():
  proc = _run(["run.py", "--help"])
  assert proc.returncode == 0, proc.stderr
  listing = proc.stdout.split("shipped configs:\n", 1)[1].splitlines()
  for path in sorted((ROOT / "configs").glob("*.py")):
    if path.name == "__init__.py":
      continue
    first = ast.get_docstring(ast.parse(path.read_text())).split("\n")[0]
    line = next((l for l in listing
                 if l.split()[0] == f"configs/{path.name}"), None)
    assert line is not None, path.name
    assert first.strip() in line, (path.name, line)


def test_override_of_the_wrong_type_is_one_error_line():
  proc = _run(["run.py", "--config", "configs/quickstart.py",
               "--config.dsp.groups=abc"])
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  assert "dsp.groups" in lines[0] and "integer" in lines[0]
  assert "FATAL" not in proc.stderr


@pytest.mark.parametrize("args", [
    ["-m", "convert", "--help"], ["-m", "convert", "export", "--help"],
    ["-m", "convert", "import", "--help"],
    ["-m", "convert", "inspect", "--help"], ["-m", "ddrop_jax", "--help"],
    ["-m", "training.launch", "--help"], ["-m", "training.cli", "--help"],
], ids=" ".join)
def test_help_is_plain_text_with_every_option_explained(args):
  proc = _run(args)
  assert proc.returncode == 0, proc.stderr
  assert "``" not in proc.stdout, proc.stdout
  assert undocumented_options(proc.stdout) == [], proc.stdout


@pytest.mark.parametrize("args", [
    ["-m", "training.config"], ["run.py", "--help"],
    ["-m", "training.cli", "config"],
], ids=" ".join)
def test_a_closed_pipe_ends_quietly(args):
  read, write = os.pipe()
  os.close(read)  # As `| head` does once it has what it wants.
  try:
    proc = _run(args, stdout=write)
  finally:
    os.close(write)
  assert proc.stderr == "", proc.stderr
  assert proc.returncode in (0, 141)


def test_entry_point_dispatches_the_commands():
  scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())[
      "project"]["scripts"]
  assert scripts["dsp-ddrop-jax"] == "training.cli:main"
  proc = _run(["-m", "training.cli", "--help"])
  for command in ("run", "convert", "ddrop", "launch", "config", "plot"):
    assert re.search(rf"^  {command} ", proc.stdout, re.M), command
  proc = _run(["-m", "training.cli", "run", "--help"])
  assert proc.returncode == 0 and "configs/quickstart.py" in proc.stdout
  proc = _run(["-m", "training.cli", "nope"])
  assert proc.returncode == 2 and proc.stderr.startswith("error: ")


def test_inspect_prints_the_summary_and_layers_on_request(tmp_path):
  import torch  # pylint: disable=import-outside-toplevel
  from convert import cli  # pylint: disable=import-outside-toplevel
  path = tmp_path / "sd.pt"
  torch.save({"conv.weight": torch.zeros(4, 3, 3, 3),
              "conv.bias": torch.zeros(4)}, path)
  short = cli.inspect(path)
  assert short.splitlines()[0].startswith(f"{path}: state dict, 2 tensors")
  assert "conv.weight" not in short and "--layers" in short
  full = cli.inspect(path, layers=True)
  assert full.startswith(short.splitlines()[0])
  assert "name, shape" in full and "conv.weight" in full


def _load_study():
  spec = importlib.util.spec_from_file_location(
      "study", ROOT / "bench" / "study.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def figures(monkeypatch):
  """The matplotlib figures saved during the test."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import figure  # pylint: disable=import-outside-toplevel
  saved, original = [], figure.Figure.savefig

  def savefig(self, *args, **kwargs):
    saved.append(self)
    return original(self, *args, **kwargs)

  monkeypatch.setattr(figure.Figure, "savefig", savefig)
  return saved


def test_study_plot_names_dataset_model_seeds_and_chance(tmp_path, figures):
  study = _load_study()
  runs = [{"model": "cifar_resnet8", "method": m, "target": t, "seed": s,
           "pflops_whole_model": t, "pparams_whole_model": t,
           "dsp_pflops": t, "acc_before_ft": a, "acc_after_ft": a + 0.01 * s}
          for s in (0, 1) for m, t, a in (("dense", 0.0, 0.9),
                                          ("ddrop", 50.0, 0.12))]
  data = {"setting": {"dataset": "fashion_mnist", "seeds": [0, 1]},
          "runs": runs}
  study.plot(data, tmp_path / "p.png")
  ax = figures[-1].axes[0]
  title = ax.get_title()
  assert "fashion_mnist" in title and "cifar_resnet8" in title
  assert "seeds 0, 1" in title and "mean ± std over 2 seeds" in title
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert "chance (10 %)" in labels
  assert "(%)" in ax.get_ylabel()


def test_run_plots_are_titled_with_the_run(tmp_path, figures):
  from training import plot  # pylint: disable=import-outside-toplevel
  workdir = tmp_path / "my_run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (
      {"stage": "pretrain", "step": 1, "split": "train", "loss": 2.0,
       "accuracy": 0.5, "lr": 0.1},
      {"stage": "pretrain", "step": 1, "split": "test", "accuracy": 0.4})))
  (workdir / "report.json").write_text(json.dumps(
      {"method": "dsp", "model": "cifar_resnet20", "dataset": "digits"}))
  plot.plot_run(workdir)
  title = figures[0]._suptitle.get_text()  # pylint: disable=protected-access
  assert title == "run my_run: dsp, cifar_resnet20 on digits"


def test_metrics_go_to_tensorboard_when_installed(tmp_path, monkeypatch):
  from training import report  # pylint: disable=import-outside-toplevel
  calls = []

  class SummaryWriter:
    def __init__(self, logdir):
      calls.append(("dir", logdir))

    def add_scalar(self, tag, value, step):
      calls.append((tag, value, step))

    def close(self):
      calls.append(("closed",))

  fake = type(sys)("tensorboardX")
  fake.SummaryWriter = SummaryWriter
  monkeypatch.setitem(sys.modules, "tensorboardX", fake)
  w = report.MetricsWriter(tmp_path)
  w.write("group", 3, "train", {"loss": 1.5, "accuracy": 0.25})
  w.close()
  assert calls == [("dir", str(tmp_path / "tensorboard")),
                   ("group/train/loss", 1.5, 3),
                   ("group/train/accuracy", 0.25, 3), ("closed",)]
  assert (tmp_path / "metrics.jsonl").is_file()


def test_missing_tensorboard_is_said_once(tmp_path, monkeypatch, capsys):
  from training import report  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # ImportError
  monkeypatch.setattr(report, "_tensorboard_note_shown", False)
  report.MetricsWriter(tmp_path / "a")
  report.MetricsWriter(tmp_path / "b")
  out = capsys.readouterr().out
  assert out.count("tensorboardX is not installed") == 1
