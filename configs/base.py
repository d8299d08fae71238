"""Plain training, every field at its default (training/config.py).

Every field of ``training/config.py`` at its default.

Plain training of a CIFAR ResNet-20 with DSP's pretraining recipe (SGD 0.9,
coupled weight decay 1e-4, lr 0.1 stepped ×0.1 at E/2 and 3E/4 with lr/4 for
the first two epochs, 164 epochs).

    python run.py --config configs/base.py --workdir runs/base \\
        --config.dataset=cifar10 --config.data_dir=~/data

Variants import this module and override fields::

    from configs import base

    def get_config():
      config = base.get_config()
      config.model = "cifar_resnet56"
      return config
"""

import ml_collections

from training import config as config_lib


def get_config() -> ml_collections.ConfigDict:
  """The default ConfigDict (the schema's defaults)."""
  return config_lib.default_config()
