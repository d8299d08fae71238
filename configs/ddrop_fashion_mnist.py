"""DDROP on Fashion-MNIST: the whole pipeline in under an hour on 2 CPU cores.

    python run.py --config configs/ddrop_fashion_mnist.py \\
        --workdir runs/ddrop_fashion_mnist

Data, network (the half-width ResNet-20) and validation split as
``configs/dsp_fashion_mnist.py``. DDROP acts on the first BatchNorm of each
of the 9 residual blocks. Recipe: 8 epochs of plain training (the DDROP
phase's one-cycle SGD, lr 0.1), 3 epochs of DDROP (keep range (0.0, 0.95),
cosine schedule, L1 1e-4 on the scales), half of every DDROP layer's units
pruned, 3 epochs of fine-tuning at lr 0.01, the slimmed PyTorch export.
docs/benchmarks.md (Fashion-MNIST) gives the measured accuracies.
"""

import ml_collections

from configs import base
from configs import dsp_fashion_mnist


def get_config() -> ml_collections.ConfigDict:
  """The DDROP Fashion-MNIST configuration."""
  config = base.get_config()
  config.method = "ddrop"
  config.workdir = "runs/ddrop_fashion_mnist"
  dsp_fashion_mnist.data_config(config)
  config.ddrop.prob = (0.0, 0.95)
  config.ddrop.schedule = "cosine"
  config.ddrop.lr = 0.1
  config.ddrop.before_epochs = 8
  config.ddrop.epochs = 3
  config.ddrop.amount = 0.5
  config.ddrop.ft_epochs = 3
  config.ddrop.ft_lr = 0.01
  return config
