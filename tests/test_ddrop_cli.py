"""``python -m ddrop_jax``: reference flags -> the same config as the files."""

import importlib
import subprocess
import sys
import pathlib

import pytest

from ddrop_jax import cli
from training import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

RESNET50_CIFAR10 = (
    "--dataset cifar10 --data-dir /data --model resnet50 --prob 0.0 0.95 "
    "--schedule cosine --total_steps 10000 --batch-size 128 --epochs 200 "
    "--lr 0.1 --weight-decay 1e-4 --before-epochs 100 --amount 0.5 "
    "--ft-epochs 50 --ft-lr 0.01 --seed 42")
VGG16_CIFAR100 = (
    "--dataset cifar100 --data-dir /data --model vgg16_bn --prob 0.1 0.9 "
    "--schedule linear --total_steps 5000 --batch-size 64 --epochs 150 "
    "--lr 0.01 --weight-decay 5e-4 --before-epochs 75 --amount 0.4 "
    "--ft-epochs 30 --ft-lr 0.005 --seed 123")
REQUIRED = "--dataset cifar10 --data-dir /data --model resnet18 --prob 0.2 0.9"


def _file_config(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  config.data_dir = "/data"
  return config


@pytest.mark.parametrize("argv,name", [
    (RESNET50_CIFAR10, "ddrop_resnet50_cifar10"),
    (VGG16_CIFAR100, "ddrop_vgg16_cifar100"),
])
def test_seed_examples_equal_the_config_files(argv, name):
  got = config_lib.to_dict(cli.parse(argv.split()))
  want = config_lib.to_dict(_file_config(name))
  assert got == want
  config_lib.validate(_file_config(name))


def test_defaults_are_the_reference_table():
  config = cli.parse(REQUIRED.split())
  d = config.ddrop
  assert config.method == "ddrop"
  assert config.model == "cifar_resnet18"
  assert tuple(d.prob) == (0.2, 0.9)
  assert d.schedule == "constant"
  assert d.total_steps == 0  # One third of the DDROP phase.
  assert (config.batch_size, config.test_batch_size) == (128, 100)
  assert (d.epochs, d.lr, d.weight_decay) == (200, 0.1, 1e-4)
  assert (d.before_epochs, d.amount, d.ft_epochs, d.ft_lr) == (
      100, 0.5, 50, 0.01)
  assert config.seed == 42
  assert config.workdir == "runs/ddrop_resnet18_cifar10"


def test_model_names_map_per_dataset():
  assert cli.model_name("resnet50", "cifar100") == "cifar_resnet50"
  assert cli.model_name("vgg16_bn", "cifar10") == "cifar_vgg16_bn"
  assert cli.model_name("resnet50", "imagenet") == "resnet50"
  assert cli.model_name("cifar_resnet10_tiny", "digits") == (
      "cifar_resnet10_tiny")


def test_required_flags():
  with pytest.raises(SystemExit):
    cli.parse("--dataset cifar10 --data-dir /d --model resnet18".split())


def test_config_passthrough_and_workdir():
  config = cli.parse(REQUIRED.split() + [
      "--workdir", "/tmp/w", "--config.ddrop.l1=0", "--config.stages=before"])
  assert config.workdir == "/tmp/w"
  assert config.ddrop.l1 == 0.0 and isinstance(config.ddrop.l1, float)
  assert config.stages == "before"


@pytest.mark.parametrize("extra,flag,words", [
    ("--prob 0.5 1.5", "--prob", "[0.0, 1.0]"),
    ("--prob -0.1 0.5", "--prob", "[0.0, 1.0]"),
    ("--prob 0.9 0.2", "--prob", "min <= max"),
    ("--amount 1.0", "--amount", "[0, 1)"),
    ("--amount -0.1", "--amount", "valid range"),
    ("--schedule step", "--schedule", "constant, cosine, linear"),
    ("--model resnet7", "--model", "valid names"),
    ("--total_steps 0", "--total_steps", "[1, inf)"),
    ("--total_steps -5", "--total_steps", "[1, inf)"),
    ("--config.ddrop.nope=1", "ddrop.nope", "valid fields"),
])
def test_bad_input_names_the_flag(extra, flag, words):
  argv = REQUIRED.replace("--prob 0.2 0.9", "").split()
  if not extra.startswith("--prob"):
    argv += ["--prob", "0.2", "0.9"]
  with pytest.raises(cli.UsageError) as e:
    cli.parse(argv + extra.split())
  msg = str(e.value)
  assert flag in msg and words in msg, msg
  assert "ddrop.prob" not in msg and "ddrop.amount" not in msg


def test_command_line_rejects_before_any_work(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "ddrop_jax", *REQUIRED.split(), "--amount", "2",
       "--workdir", str(tmp_path / "w")],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "--amount" in out.stderr
  assert not (tmp_path / "w").exists()
