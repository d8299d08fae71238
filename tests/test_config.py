"""The config schema: defaults, validation messages, the command line."""

import pathlib
import subprocess
import sys

import pytest

import models
from training import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("cfg", ROOT / path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("path", ["configs/base.py", "configs/quickstart.py"])
def test_shipped_configs_are_valid(path):
  config_lib.validate(_load(path))


def test_every_field_is_documented_and_its_default_valid():
  fields = config_lib.fields()
  assert len(fields) > 60
  for path, f in fields.items():
    assert len(f.doc) > 5, path
  config_lib.validate(config_lib.default_config())


def test_seed_readme_flags_have_fields():
  fields = config_lib.fields()
  ddrop = ["dataset", "data_dir", "model", "ddrop.prob", "ddrop.schedule",
           "ddrop.total_steps", "batch_size", "test_batch_size",
           "ddrop.epochs", "ddrop.lr", "ddrop.weight_decay",
           "ddrop.before_epochs", "ddrop.amount", "ddrop.ft_epochs",
           "ddrop.ft_lr", "seed"]
  dsp = ["dsp.groups", "dsp.regularize", "dsp.temperature", "dsp.prune_rate",
         "dsp.cycles", "dsp.momentum", "dsp.pretrain_wd", "dsp.group_wd",
         "dsp.finetune_wd", "dsp.pretrain_epochs", "dsp.group_epochs",
         "dsp.finetune_epochs"]
  missing = [f for f in ddrop + dsp if f not in fields]
  assert not missing
  # Reference defaults (docs/concepts.md, DSP).
  c = config_lib.default_config()
  assert (c.dsp.pretrain_epochs, c.dsp.group_epochs, c.dsp.finetune_epochs,
          c.dsp.cycles) == (164, 120, 400, 5)
  assert (c.dsp.group_lr, c.dsp.finetune_lr, c.dsp.regularize,
          c.dsp.temperature, c.dsp.gate_lr) == (0.05, 0.015, 2e-3, 0.5, 1e-3)


@pytest.mark.parametrize("change, message", [
    (lambda c: setattr(c.optim, "schedule", "linear"),
     "optim.schedule: invalid value 'linear'; valid choices: constant, "
     "dsp_step"),
    (lambda c: setattr(c, "model", "resnet1000"),
     "model: unknown model 'resnet1000'; valid names: "),
    (lambda c: setattr(c.ddrop, "prob", (0.9, 0.1)),
     "ddrop.prob: needs min <= max"),
    (lambda c: setattr(c.ddrop, "amount", 1.5),
     r"ddrop.amount: 1.5 is out of the valid range \[0.0, 1.0\]"),
    (lambda c: setattr(c, "batch_size", 0),
     "batch_size: 0 is out of the valid range"),
    (lambda c: setattr(c, "dataset", "mnist"),
     "dataset: unknown dataset 'mnist'; valid: digits, cifar10, cifar100"),
    (lambda c: (setattr(c, "method", "train"), setattr(c, "stages", "pack")),
     "stages: \\['pack'\\] are not stages of method 'train'"),
])
def test_invalid_values_name_field_and_valid_values(change, message):
  c = config_lib.default_config()
  change(c)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(c)


def test_types_are_checked_on_plain_dicts_too():
  d = config_lib.default_config().to_dict()
  d["epochs"] = 2.5
  d["optim"]["nesterov"] = 1
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(d)
  assert "epochs: expected int, got float 2.5" in str(e.value)
  assert "optim.nesterov: expected bool, got int 1" in str(e.value)


def test_model_error_lists_registry_names():
  c = config_lib.default_config()
  c.model = "nope"
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert all(name in str(e.value) for name in models.list_models())


def test_unknown_fields_are_rejected_with_valid_fields():
  c = config_lib.default_config()
  c.optim.learning_rate = 0.1
  c.dsp.group = 3
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert "optim.learning_rate: unknown field; valid fields here: " in msg
  assert "lr" in msg and "dsp.group: unknown field" in msg and "groups" in msg
  with pytest.raises(config_lib.ConfigError, match="optim.lrate: unknown.*lr"):
    config_lib.check_override_paths(["--config.optim.lrate=1"])
  with pytest.raises(config_lib.ConfigError, match="nope.x: unknown.*dsp"):
    config_lib.check_override_paths(["--config.nope.x=1"])
  config_lib.check_override_paths(["--config.optim.lr=1", "--workdir=x"])


def test_config_hash_ignores_runtime_fields_only():
  a, b = config_lib.default_config(), config_lib.default_config()
  b.workdir, b.log_every_steps, b.max_steps = "elsewhere", 7, 3
  assert config_lib.config_hash(a) == config_lib.config_hash(b)
  b.optim.lr = 0.2
  assert config_lib.config_hash(a) != config_lib.config_hash(b)
  only = ("model", "dsp")
  assert config_lib.config_hash(a, only) == config_lib.config_hash(b, only)
  b.dsp.groups = 2
  assert config_lib.config_hash(a, only) != config_lib.config_hash(b, only)


def test_selected_stages_keep_method_order():
  c = config_lib.default_config()
  c.method, c.stages = "dsp", "pack,group"
  assert config_lib.selected_stages(c) == ("group", "pack")
  c.stages = "all"
  assert config_lib.selected_stages(c) == config_lib.STAGES["dsp"]


@pytest.mark.parametrize("override, message", [
    ("--config.optim.lrate=0.1", "optim.lrate: unknown field"),
    ("--config.model=resnet1000", "model: unknown model 'resnet1000'"),
    ("--config.optim.optimizer=lamb",
     "optim.optimizer: invalid value 'lamb'; valid choices: sgd, adamw"),
])
def test_run_py_rejects_before_any_work(tmp_path, override, message):
  r = subprocess.run([sys.executable, "run.py", "--config", "configs/base.py",
                      "--workdir", str(tmp_path / "w"), override], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode != 0
  assert message in r.stderr
  assert not (tmp_path / "w").exists()


def test_width_factor_follows_the_dataset_and_is_rejected_elsewhere():
  from training import pipeline  # pylint: disable=import-outside-toplevel
  config = config_lib.default_config()
  config.model = "cifar_resnet18"
  config.dataset = "cifar100"
  assert pipeline.build_model(config, 100).factor == 2
  config.dataset = "cifar10"
  assert pipeline.build_model(config, 10).factor == 1
  config.width_factor = 3
  assert pipeline.build_model(config, 10).factor == 3
  config.model = "cifar_resnet20"
  with pytest.raises(config_lib.ConfigError, match="width_factor"):
    pipeline.build_model(config, 10)
