"""Quickstart: a tiny CIFAR ResNet on the built-in digits data, CPU minutes.

    python run.py --config configs/quickstart.py --workdir runs/quickstart

CIFAR ResNet-20, batch 64, 10 epochs of SGD (momentum 0.9, coupled weight
decay 5e-4) with a one-cycle schedule peaking at lr 0.1: 19 steps per epoch
on the 1257 training digits.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The quickstart configuration."""
  config = base.get_config()
  config.workdir = "runs/quickstart"
  config.dataset = "digits"
  config.model = "cifar_resnet20"
  config.batch_size = 64
  config.test_batch_size = 200
  config.epochs = 10
  config.optim.schedule = "onecycle"
  config.optim.lr = 0.1
  config.optim.weight_decay = 5e-4
  config.checkpoint_every_steps = 100
  config.log_every_steps = 10
  config.eval_every_epochs = 5
  return config
