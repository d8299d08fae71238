"""DDROP, ResNet-50 (CIFAR layout) on CIFAR-10: the reference README's example.

    python run.py --config configs/ddrop_resnet50_cifar10.py \\
        --workdir runs/ddrop_resnet50_cifar10 --config.data_dir=/path/to/data

is the same run as the reference command line, spelled with our CLI::

    python -m ddrop_jax --dataset cifar10 --data-dir /path/to/data \\
        --model resnet50 --prob 0.0 0.95 --schedule cosine \\
        --total_steps 10000 --batch-size 128 --epochs 200 --lr 0.1 \\
        --weight-decay 1e-4 --before-epochs 100 --amount 0.5 --ft-epochs 50 \\
        --ft-lr 0.01 --seed 42

100 epochs of plain training, 200 of DDROP (keep range reaching (0.0, 0.95)
over 10000 steps on a cosine schedule), pruning half the units of every
DDROP layer, 50 epochs of fine-tuning at lr 0.01, then the slimmed export.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The configuration."""
  config = base.get_config()
  config.method = "ddrop"
  config.workdir = "runs/ddrop_resnet50_cifar10"
  config.dataset = "cifar10"
  config.model = "cifar_resnet50"
  config.seed = 42
  config.batch_size = 128
  config.test_batch_size = 100
  config.ddrop.prob = (0.0, 0.95)
  config.ddrop.schedule = "cosine"
  config.ddrop.total_steps = 10000
  config.ddrop.epochs = 200
  config.ddrop.lr = 0.1
  config.ddrop.weight_decay = 1e-4
  config.ddrop.before_epochs = 100
  config.ddrop.amount = 0.5
  config.ddrop.ft_epochs = 50
  config.ddrop.ft_lr = 0.01
  return config
