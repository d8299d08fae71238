"""DDROP, VGG-16-bn (CIFAR layout) on CIFAR-100: the reference's 2nd example.

The second example command of the reference README.

    python run.py --config configs/ddrop_vgg16_cifar100.py \\
        --workdir runs/ddrop_vgg16_bn_cifar100 --config.data_dir=~/data

is the same run as the reference command line, spelled with our CLI::

    python -m ddrop_jax --dataset cifar100 --data-dir ~/data --model vgg16_bn \\
        --prob 0.1 0.9 --schedule linear --total_steps 5000 --batch-size 64 \\
        --epochs 150 --lr 0.01 --weight-decay 5e-4 --before-epochs 75 \\
        --amount 0.4 --ft-epochs 30 --ft-lr 0.005 --seed 123
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The configuration."""
  config = base.get_config()
  config.method = "ddrop"
  config.workdir = "runs/ddrop_vgg16_bn_cifar100"
  config.dataset = "cifar100"
  config.model = "cifar_vgg16_bn"
  config.seed = 123
  config.batch_size = 64
  config.test_batch_size = 100
  config.ddrop.prob = (0.1, 0.9)
  config.ddrop.schedule = "linear"
  config.ddrop.total_steps = 5000
  config.ddrop.epochs = 150
  config.ddrop.lr = 0.01
  config.ddrop.weight_decay = 5e-4
  config.ddrop.before_epochs = 75
  config.ddrop.amount = 0.4
  config.ddrop.ft_epochs = 30
  config.ddrop.ft_lr = 0.005
  return config
