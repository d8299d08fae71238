"""DSP on CIFAR-10 with ResNet-20, the reference recipe (λ = 2e-3).

    python run.py --config configs/dsp_cifar10_resnet20.py:g4 \\
        --workdir runs/dsp_r20_g4 --config.data_dir=~/data

Variant ``g2``, ``g3`` or ``g4`` (default) selects the group count; see
``configs/dsp_cifar10.py`` for the recipe and the pruning-rate choice.
"""

import ml_collections

from configs import dsp_cifar10


def get_config(arg: str = "g4") -> ml_collections.ConfigDict:
  """The ResNet-20 recipe with groups from ``arg`` (g2, g3 or g4)."""
  return dsp_cifar10.recipe(*dsp_cifar10.parse(arg, depth=20))
