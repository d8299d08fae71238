"""The DDROP command line, with the reference tool's flags and defaults.

    python -m ddrop_jax --dataset cifar10 --data-dir ~/data --model resnet50 \\
        --prob 0.0 0.95 [--schedule cosine] [--total_steps 10000] ... \\
        [--workdir DIR] [--config.FIELD=VALUE ...]

Every flag maps to one field of ``training/config.py`` (table in its module
docstring); the config is ``configs/base.py``'s with those fields set, then
validated and run by the same pipeline as ``run.py --config`` with
``method='ddrop'``. Differences from the reference tool:

* ``--model``: with a CIFAR dataset, ``resnet18/34/50`` and ``vgg*_bn`` are
  the CIFAR variants of the model zoo (``cifar_resnet50``,
  ``cifar_vgg16_bn``); with ImageNet the names are used as they are.
* ``--total_steps``: optimizer steps of the keep-range schedule (default one
  third of the DDROP phase's steps).
* ``--workdir``: the run directory (default ``runs/ddrop_MODEL_DATASET``).
* ``--config.FIELD=VALUE``: any other schema field (Python literal or bare
  string), e.g. ``--config.ddrop.l1=0`` or ``--config.stages=before,ddrop``.

Invalid values stop the run before any work, naming the flag and the valid
range or choices.
"""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Any, Sequence

import ml_collections

from configs import base
from configs import imagenet
from training import config as config_lib

CIFAR_DATASETS = ("cifar10", "cifar100")
# ``--dataset imagenet``: tfds's imagenet2012 when prepared under --data-dir,
# else the image-folder tree at --data-dir; the ImageNet data recipe of
# configs/imagenet.py either way.
IMAGENET = "imagenet"
# Flag -> config field (flags not listed here set the field of the same name).
FLAG_FIELDS = {
    "--dataset": "dataset", "--data-dir": "data_dir", "--model": "model",
    "--prob": "ddrop.prob", "--schedule": "ddrop.schedule",
    "--total_steps": "ddrop.total_steps", "--batch-size": "batch_size",
    "--test-batch-size": "test_batch_size", "--epochs": "ddrop.epochs",
    "--lr": "ddrop.lr", "--weight-decay": "ddrop.weight_decay",
    "--before-epochs": "ddrop.before_epochs", "--amount": "ddrop.amount",
    "--ft-epochs": "ddrop.ft_epochs", "--ft-lr": "ddrop.ft_lr",
    "--seed": "seed", "--workdir": "workdir",
}


class UsageError(ValueError):
  """A flag with an invalid value (the message names the flag)."""


def build_parser() -> argparse.ArgumentParser:
  """The reference tool's flags (README table) plus ``--workdir``."""
  p = argparse.ArgumentParser(
      prog="python -m ddrop_jax",
      description="DDROP: dynamic dropout pruning (before -> ddrop -> prune "
      "-> finetune -> pack). Extra --config.FIELD=VALUE arguments set any "
      "field of training/config.py.")
  p.add_argument("--dataset", required=True,
                 help=", ".join(config_lib.DATASETS) + ", imagenet "
                 "(imagenet2012 prepared under --data-dir, else the image-"
                 "folder tree there), imagefolder:PATH or tfds:NAME")
  p.add_argument("--data-dir", default="",
                 help="dataset root directory (default: the data module's; "
                 "the built-in digits need none)")
  p.add_argument("--model", required=True,
                 help="resnet18, resnet34, resnet50, vgg11_bn, ... (the CIFAR "
                 "variant with a CIFAR dataset)")
  p.add_argument("--prob", required=True, type=float, nargs=2,
                 metavar=("MIN", "MAX"),
                 help="keep-probability range of the least/most important "
                 "unit, in [0, 1] with MIN <= MAX")
  p.add_argument("--schedule", default="constant",
                 help="constant, cosine or linear (default constant)")
  p.add_argument("--total_steps", type=int, default=None,
                 help="optimizer steps of the schedule progression (default "
                 "one third of the DDROP phase)")
  p.add_argument("--batch-size", type=int, default=128,
                 help="global training batch (default 128)")
  p.add_argument("--test-batch-size", type=int, default=100,
                 help="evaluation batch (default 100)")
  p.add_argument("--epochs", type=int, default=200,
                 help="DDROP-phase epochs")
  p.add_argument("--lr", type=float, default=0.1,
                 help="peak lr of the before and DDROP phases (default 0.1)")
  p.add_argument("--weight-decay", type=float, default=1e-4,
                 help="weight decay on weight parameters (default 1e-4)")
  p.add_argument("--before-epochs", type=int, default=100,
                 help="plain-training epochs before DDROP (0 skips)")
  p.add_argument("--amount", type=float, default=0.5,
                 help="fraction of units pruned per layer, in [0, 1)")
  p.add_argument("--ft-epochs", type=int, default=50,
                 help="fine-tuning epochs after pruning (default 50)")
  p.add_argument("--ft-lr", type=float, default=0.01,
                 help="fine-tuning peak lr (default 0.01)")
  p.add_argument("--seed", type=int, default=42,
                 help="random seed (default 42)")
  p.add_argument("--workdir", default=None,
                 help="run directory (default runs/ddrop_MODEL_DATASET)")
  return p


def imagenet_dataset(data_dir: str) -> str:
  """The dataset ``--dataset imagenet`` names for ``data_dir``."""
  from training import datasets  # tfds, no JAX.
  try:
    return datasets.imagenet_dataset(data_dir)
  except datasets.LayoutError as e:
    raise UsageError(f"--data-dir: {e}") from None


def model_name(model: str, dataset: str) -> str:
  """The registry name of a reference ``--model`` on ``dataset``."""
  if dataset in CIFAR_DATASETS and not model.startswith("cifar_"):
    return "cifar_" + model
  return model


def _flag_of(field: str) -> str:
  for flag, f in FLAG_FIELDS.items():
    if f == field:
      return flag
  return f"--config.{field}"


def flag_message(error: config_lib.ConfigError) -> str:
  """``error``'s message with field paths written as the flags that set them.

  Args:
    error: a ``ConfigError`` from ``config_lib.validate``.

  Returns:
    One line per problem, each starting with its flag.
  """
  lines = []
  for line in str(error).splitlines():
    stripped = line.strip()
    field, sep, rest = stripped.partition(":")
    if sep and field in config_lib.fields():
      stripped = f"{_flag_of(field)}:{rest}"
    lines.append(stripped)
  return "\n  ".join(lines)


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _set(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  *parents, leaf = path.split(".")
  for p in parents:
    config = config[p]
  if isinstance(config[leaf], float) and isinstance(value, int) and not (
      isinstance(value, bool)):
    value = float(value)
  if isinstance(config[leaf], tuple) and isinstance(value, list):
    value = tuple(value)
  config[leaf] = value


def make_config(args: argparse.Namespace,
                overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """``configs/base.py``'s config with the flags' fields set, validated.

  Args:
    args: parsed flags (``build_parser``).
    overrides: ``--config.FIELD=VALUE`` arguments.

  Returns:
    The run config.

  Raises:
    UsageError: an invalid flag value, named with its valid range/choices.
  """
  if args.total_steps is not None and args.total_steps < 1:
    raise UsageError(f"--total_steps: {args.total_steps} is out of the valid "
                     "range [1, inf) (optimizer steps; leave it out for one "
                     "third of the DDROP phase)")
  config = base.get_config()
  config.method = "ddrop"
  config.dataset = args.dataset
  if args.dataset == IMAGENET:
    config.dataset = imagenet_dataset(args.data_dir)
    imagenet.recipe(config)
  config.data_dir = args.data_dir
  config.model = model_name(args.model, args.dataset)
  config.seed = args.seed
  config.batch_size = args.batch_size
  config.test_batch_size = args.test_batch_size
  config.workdir = args.workdir or f"runs/ddrop_{args.model}_{args.dataset}"
  d = config.ddrop
  d.prob = tuple(args.prob)
  d.schedule = args.schedule
  d.total_steps = args.total_steps or 0
  d.epochs = args.epochs
  d.lr = args.lr
  d.weight_decay = args.weight_decay
  d.before_epochs = args.before_epochs
  d.amount = args.amount
  d.ft_epochs = args.ft_epochs
  d.ft_lr = args.ft_lr
  try:
    config_lib.check_override_paths(list(overrides))
  except config_lib.ConfigError as e:
    raise UsageError(str(e)) from None
  for arg in overrides:
    path, sep, text = arg[len("--config."):].partition("=")
    if not sep:
      raise UsageError(f"{arg}: expected --config.FIELD=VALUE")
    _set(config, path, _literal(text))
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    raise UsageError(flag_message(e)) from None
  return config


def parse(argv: Sequence[str]) -> ml_collections.ConfigDict:
  """Parses the command line into a validated config.

  Args:
    argv: arguments without the program name.

  Returns:
    The run config.

  Raises:
    UsageError: invalid values; SystemExit for unknown or missing flags.
  """
  overrides = [a for a in argv if a.startswith("--config.")]
  rest = [a for a in argv if not a.startswith("--config.")]
  args = build_parser().parse_args(rest)
  return make_config(args, overrides)


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of ``python -m ddrop_jax``; returns the exit status."""
  argv = sys.argv[1:] if argv is None else list(argv)
  try:
    config = parse(argv)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  from training import errors
  with errors.reported([config.workdir]):
    # After validation: these import JAX.
    from training import checkpoint, command, loop
    with errors.reported([config.workdir], extra=(
        loop.TrainingDiverged, checkpoint.CheckpointError)):
      command.dispatch(config, config.workdir)
  return 0
