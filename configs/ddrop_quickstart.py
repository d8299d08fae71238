"""DDROP quickstart: a tiny CIFAR ResNet on the built-in digits data.

    python run.py --config configs/ddrop_quickstart.py \\
        --workdir runs/ddrop_quickstart

or, with the reference-style command line::

    python -m ddrop_jax --dataset digits --data-dir '' \\
        --model cifar_resnet10_tiny --prob 0.0 0.95 --schedule cosine \\
        --batch-size 64 --test-batch-size 200 --epochs 10 --lr 0.1 \\
        --before-epochs 5 --amount 0.5 --ft-epochs 5 --ft-lr 0.01 \\
        --workdir runs/ddrop_quickstart

``cifar_resnet10_tiny`` (one BasicBlock per stage, widths 4/8/8/16, 6.5k
parameters; DDROP acts on the four blocks' first BN) on the 1257 training
digits (32x32, 19 steps per epoch): 5 epochs of plain training, 10 of DDROP
(keep range reaching (0.0, 0.95) after a third of the phase on a cosine
schedule), half of every DDROP layer's units pruned, 5 epochs of
fine-tuning, then the slimmed PyTorch export. About 2-3 minutes on 2 CPU
cores (mostly compilation).
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
  """The quickstart configuration."""
  config = base.get_config()
  config.method = "ddrop"
  config.workdir = "runs/ddrop_quickstart"
  config.dataset = "digits"
  config.model = "cifar_resnet10_tiny"
  config.batch_size = 64
  config.test_batch_size = 200
  config.ddrop.prob = (0.0, 0.95)
  config.ddrop.schedule = "cosine"
  config.ddrop.epochs = 10
  config.ddrop.lr = 0.1
  config.ddrop.before_epochs = 5
  config.ddrop.amount = 0.5
  config.ddrop.ft_epochs = 5
  config.ddrop.ft_lr = 0.01
  config.checkpoint_every_steps = 100
  config.log_every_steps = 10
  config.eval_every_epochs = 5
  return config
